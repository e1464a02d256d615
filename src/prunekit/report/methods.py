"""The ``prunekit methods`` listing: each method, what it prunes and needs, and its options, from its config."""

from __future__ import annotations

import textwrap
from collections.abc import Iterable

HELP_WIDTH = 72


def describe_methods(methods: Iterable, show_internal: bool = False) -> str:
    """Every method as a block: name and description, capabilities, then one row per option."""
    return "\n\n".join(describe_method(method, show_internal) for method in methods)


def describe_method(method, show_internal: bool = False) -> str:
    lines = [f"{method.name}: {method.description}"]
    lines += textwrap.wrap(_capabilities(method), 110, initial_indent="  ", subsequent_indent="  ")
    specs = [spec for spec in method.config.options() if show_internal or not spec.internal]
    if not specs:
        return "\n".join([*lines, "  options: none"])
    name_width = max(len("option"), *(len(spec.name) for spec in specs))
    type_width = max(len("type"), *(len(spec.type_name) for spec in specs))
    default_width = max(len("default"), *(len(_default(spec.default)) for spec in specs))
    lines.append(f"  {'option'.ljust(name_width)}  {'type'.ljust(type_width)}  {'default'.ljust(default_width)}  "
                 "help (--option NAME=VALUE)")
    indent = " " * (6 + name_width + type_width + default_width + 2)
    for spec in specs:
        help_text = f"{spec.help}; takes {spec.accepts()}" + (" [internal]" if spec.internal else "")
        wrapped = textwrap.wrap(help_text, HELP_WIDTH) or [""]
        lines.append(f"  {spec.name.ljust(name_width)}  {spec.type_name.ljust(type_width)}  "
                     f"{_default(spec.default).ljust(default_width)}  {wrapped[0]}")
        lines += [indent + continuation for continuation in wrapped[1:]]
    return "\n".join(lines)


def _capabilities(method) -> str:
    capabilities = method.capabilities
    what = "width (heads, channels)" if capabilities.kind == "width" else "depth (blocks, layers)"
    data = (f"calibration {method.calibration_tokens:,} tokens in windows of {method.calibration_seqlen}"
            if capabilities.needs_calibration else "no calibration data")
    flags = [f"gradients: {'yes' if capabilities.needs_gradients else 'no'}",
             f"edits weights: {'yes' if capabilities.edits_weights else 'no'}",
             f"resumable: {'yes' if capabilities.resumable else 'no'}",
             f"nested results: {'yes' if capabilities.nested else 'no'}"]
    return f"prunes {what}; {data}; " + ", ".join(flags)


def _default(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)
