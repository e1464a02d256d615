"""The files of a compare run, written from its cells only: results.json / .csv / .md, plots, report.html.

Everything here reads the JSON cells ``evaluation.compare`` recorded, so a report is rebuilt in seconds (a rerun of
``prunekit compare`` with nothing left to compute does just that). The HTML file is self-contained (plots embedded
as PNG data, no script or style from elsewhere): it opens in any browser without prunekit.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path
from typing import Any

from prunekit._atomic import write_bytes_atomic, write_json_atomic
from prunekit.evaluation.compare import DENSE, read_cells
from prunekit.evaluation.machine import machine_info
from prunekit.report.tables import accuracy_cell

PLOTS = ("perplexity", "accuracy", "speedup")
CHANCE = {"prunekit_continuation": 0.25}


def headline_metric(row: dict[str, Any]) -> str:
    """acc_norm where a task has it (multiple choice), else acc."""
    return "acc_norm" if row.get("acc_norm") is not None else "acc"


def table_rows(settings: dict[str, Any], cells: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The summary table (Markdown and HTML): one row per cell, dense first."""
    corpora = _corpora(cells)
    tasks = _tasks(cells)
    headers = ["method", "target", "ratio_all", "ratio_layers", "parameters",
               *[f"ppl {c}" for c in corpora], *[f"{t} {_task_metric(cells, t)}" for t in tasks],
               "prune s", "prune peak MiB", *[f"prefill {s} x" for s in settings["speed_shapes"]], "decode x"]
    rows = []
    for cell in cells:
        if cell["status"] != "ok":
            rows.append([cell["method"], _ratio(cell), f"failed: {cell['error']}"] + [""] * (len(headers) - 3))
            continue
        params = cell["parameters"]
        zero = cell.get("zero_shot", {}).get("tasks", {})
        speedup = cell.get("speedup") or {}
        rows.append([
            cell["method"], _ratio(cell), f"{params['ratio_all']:.1%}", f"{params['ratio_layers']:.1%}",
            f"{params['pruned_parameters']:,}",
            *[_ppl(cell["perplexity"].get(c)) for c in corpora],
            *[accuracy_cell(zero.get(t), _task_metric(cells, t), 3, "±") for t in tasks],
            _number(cell.get("prune_seconds"), "{:.1f}") + (" (shared search)" if cell.get("search_shared") else ""),
            _number(_mib(cell.get("prune_peak_memory_bytes")), "{:.0f}"),
            *[_number((speedup.get("prefill") or {}).get(s), "{:.2f}") if cell["method"] != DENSE else "1.00"
              for s in settings["speed_shapes"]],
            _number(speedup.get("decode"), "{:.2f}") if cell["method"] != DENSE else "1.00",
        ])
    return headers, rows


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(cells: list[dict[str, Any]]) -> str:
    """Every number of every cell, one row per cell (standard errors included)."""
    corpora, tasks = _corpora(cells), _tasks(cells)
    fields = ["method", "target_ratio", "status", "error", "ratio_all", "ratio_layers", "parameters",
              *[f"ppl_{c}" for c in corpora],
              *[f"{t}_{m}{e}" for t in tasks for m in ("acc", "acc_norm") for e in ("", "_stderr")],
              "prune_seconds", "search_shared", "prune_peak_memory_bytes", "prefill_speedup", "decode_speedup"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for cell in cells:
        row: dict[str, Any] = {"method": cell["method"], "target_ratio": cell["ratio"], "status": cell["status"],
                               "error": cell.get("error", "")}
        if cell["status"] == "ok":
            params, zero = cell["parameters"], cell.get("zero_shot", {}).get("tasks", {})
            speedup = cell.get("speedup") or {}
            row.update(ratio_all=params["ratio_all"], ratio_layers=params["ratio_layers"],
                       parameters=params["pruned_parameters"], prune_seconds=cell.get("prune_seconds"),
                       search_shared=cell.get("search_shared"),
                       prune_peak_memory_bytes=cell.get("prune_peak_memory_bytes"),
                       prefill_speedup=next(iter((speedup.get("prefill") or {}).values()), None),
                       decode_speedup=speedup.get("decode"))
            row.update({f"ppl_{c}": cell["perplexity"].get(c) for c in corpora})
            for task in tasks:
                for key, value in (zero.get(task) or {}).items():
                    if f"{task}_{key}" in fields:
                        row[f"{task}_{key}"] = value
        writer.writerow(row)
    return buffer.getvalue()


def write_report(out: str | Path, command: str | None = None) -> dict[str, Path]:
    """Write results.json, results.csv, results.md, plots/*.png and report.html into the run directory."""
    out = Path(out)
    settings, cells = read_cells(out)
    headers, rows = table_rows(settings, cells)
    figures = {name: make(cells) for name, make in
               (("perplexity", perplexity_plot), ("accuracy", accuracy_plot), ("speedup", speedup_plot))}
    figures.update(kept_plots(cells))
    figures = {name: png for name, png in figures.items() if png is not None}
    machine = machine_info(settings["device"])
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md",
             "html": out / "report.html"}
    write_json_atomic(paths["json"], {"settings": settings, "command": command, "machine": machine,
                                      "cells": cells}, indent=2, allow_nan=True)
    write_bytes_atomic(paths["csv"], csv_text(cells).encode())
    write_bytes_atomic(paths["md"], (markdown_table(headers, rows) + "\n").encode())
    for name, png in figures.items():
        (out / "plots").mkdir(exist_ok=True)
        write_bytes_atomic(out / "plots" / f"{name}.png", png)
    write_bytes_atomic(paths["html"], html_report(settings, cells, headers, rows, figures, command, machine).encode())
    return paths


# -- plots ----------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(figure)
    return buffer.getvalue()


def _series(cells: list[dict[str, Any]], value) -> dict[str, tuple[list[float], list[float]]]:
    """Per method: (measured ratio_all, value) of its ok cells, in ratio order, dense excluded."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for cell in cells:
        if cell["status"] != "ok" or cell["method"] == DENSE:
            continue
        y = value(cell)
        if y is None:
            continue
        xs, ys = series.setdefault(cell["method"], ([], []))
        xs.append(cell["parameters"]["ratio_all"])
        ys.append(y)
    return series


def _line_panels(cells, panels: list[tuple[str, Any, Any]], ylabel: str, log: bool = False) -> bytes | None:
    """One subplot per (title, value function, dense value); a line per method over the measured ratio."""
    if not panels:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for axis, (title, value, reference) in zip(axes[0], panels, strict=True):
        for method, (xs, ys) in _series(cells, value).items():
            axis.plot([100 * x for x in xs], ys, marker="o", label=method)
        if reference is not None:
            axis.axhline(reference, color="black", linestyle="--", linewidth=1, label="dense")
        axis.set_title(title)
        axis.set_xlabel("parameters removed (% of all)")
        axis.set_ylabel(ylabel)
        if log:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _png(figure)


def perplexity_plot(cells: list[dict[str, Any]]) -> bytes | None:
    dense = _dense(cells)
    panels = [(f"perplexity: {c}", lambda cell, c=c: _finite(cell["perplexity"].get(c)),
               dense["perplexity"].get(c) if dense else None) for c in _corpora(cells)]
    return _line_panels(cells, panels, "perplexity (log scale)", log=True)


def accuracy_plot(cells: list[dict[str, Any]]) -> bytes | None:
    dense = _dense(cells)
    panels = []
    for task in _tasks(cells):
        metric = _task_metric(cells, task)

        def value(cell, task=task, metric=metric):
            return ((cell.get("zero_shot") or {}).get("tasks", {}).get(task) or {}).get(metric)

        panels.append((f"{task} ({metric})", value, value(dense) if dense else None))
    return _line_panels(cells, panels, "accuracy")


def speedup_plot(cells: list[dict[str, Any]]) -> bytes | None:
    shapes = sorted({s for c in cells if c["status"] == "ok" for s in (c.get("speedup") or {}).get("prefill", {})})
    panels = [(f"prefill {shape} speed-up", lambda cell, s=shape: (cell.get("speedup") or {}).get("prefill", {})
               .get(s), 1.0) for shape in shapes]
    panels.append(("decode speed-up", lambda cell: (cell.get("speedup") or {}).get("decode"), 1.0))
    return _line_panels(cells, panels, "pruned / dense throughput")


def kept_plots(cells: list[dict[str, Any]]) -> dict[str, bytes]:
    """Per target ratio: per method, the kept share of each layer's heads and channels; removed blocks marked."""
    dense = _dense(cells)
    if dense is None:
        return {}
    plt = _pyplot()
    full = {layer["layer"]: layer for layer in dense["layers"]}
    figures = {}
    for ratio in sorted({c["ratio"] for c in cells if c["status"] == "ok" and c["method"] != DENSE}):
        chosen = [c for c in cells if c["status"] == "ok" and c["method"] != DENSE and c["ratio"] == ratio]
        height = 1.25 * len(chosen) + 1.0
        figure, axes = plt.subplots(len(chosen), 1, figsize=(11, height), squeeze=False, sharex=True)
        for axis, cell in zip(axes[:, 0], chosen, strict=True):
            _kept_panel(axis, cell, full)
        axes[-1][0].set_xlabel("decoder layer")
        # Title and legend in the top 0.75 inch, whatever the number of methods.
        figure.subplots_adjust(top=1 - 0.75 / height, hspace=0.25)
        figure.suptitle(f"What each method kept at target {ratio:.0%} (share of the dense layer)",
                        y=1 - 0.1 / height)
        handles, labels = axes[0][0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="upper center", ncol=4, fontsize=8,
                      bbox_to_anchor=(0.5, 1 - 0.3 / height))
        figures[f"kept_{ratio:g}"] = _png(figure)
    return figures


def _kept_panel(axis, cell: dict[str, Any], full: dict[int, dict[str, Any]]) -> None:
    kept = {layer["layer"]: layer for layer in cell["layers"]}
    layers = sorted(full)
    heads = [kept[i]["heads"] / full[i]["heads"] if i in kept else 0.0 for i in layers]
    channels = [kept[i]["channels"] / full[i]["channels"] if i in kept else 0.0 for i in layers]
    axis.bar([i - 0.2 for i in layers], heads, width=0.4, color="#4c72b0", label="attention heads kept")
    axis.bar([i + 0.2 for i in layers], channels, width=0.4, color="#dd8452", label="MLP channels kept")
    gone_attention = [i for i in layers if i not in kept or not kept[i]["attention"]]
    gone_mlp = [i for i in layers if i not in kept or not kept[i]["mlp"]]
    axis.scatter([i - 0.2 for i in gone_attention], [0.08] * len(gone_attention), marker="x", color="#c44e52",
                 label="attention block removed", zorder=3)
    axis.scatter([i + 0.2 for i in gone_mlp], [0.08] * len(gone_mlp), marker="x", color="#8c1c13",
                 label="MLP block removed", zorder=3)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel(cell["method"], rotation=0, ha="right", va="center", fontsize=9)
    axis.set_yticks([0, 0.5, 1])
    axis.tick_params(labelsize=7)


# -- HTML -----------------------------------------------------------------------------------------------------


def html_report(settings, cells, headers, rows, figures, command, machine) -> str:
    """One self-contained page: what was run, the table, the plots, the failures."""
    failed = [c for c in cells if c["status"] != "ok"]
    images = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(_caption(name))}</figcaption></figure>" for name, png in figures.items())
    table = "<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr></thead><tbody>"
    table += "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    table += "</tbody></table>"
    facts = [("model", settings["model"]), ("command", command or "-"),
             ("calibration", f"{settings['calib_tokens']:,} tokens of {settings['calib']} in windows of "
                             f"{settings['seqlen']}, seed {settings['seed']}, shared by every cell"),
             ("perplexity", f"{settings['eval_tokens']:,} tokens per corpus ({', '.join(settings['eval_corpora'])}), "
                            f"windows of {settings['eval_seqlen']}"),
             ("zero-shot", f"lm-eval, tasks {', '.join(settings['tasks']) or 'none'}"
                           + (f", first {settings['task_limit']} items each" if settings["task_limit"] else "")),
             ("speed", f"median of {settings['speed_repeats']} runs: prefill {', '.join(settings['speed_shapes'])}, "
                       f"decode {settings['decode_tokens']} tokens; x = pruned / dense throughput"),
             ("machine", f"{machine['cpu_model']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
                         f"{settings['dtype']} on {settings['device']}"),
             ("report written", machine["date"])]
    facts_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    failures = "".join(f"<li><b>{html.escape(c['method'])} @ {c['ratio']:g}</b>: {html.escape(c['error'])}</li>"
                       for c in failed)
    return _PAGE.format(title=html.escape(f"prunekit compare: {settings['model']}"), facts=facts_html, table=table,
                        images=images, failures=f"<h2>Failed cells</h2><ul>{failures}</ul>" if failed else "")


def _caption(name: str) -> str:
    if name.startswith("kept_"):
        return f"Per-layer structure kept by each method at target ratio {float(name[5:]):.0%}."
    return {"perplexity": "Perplexity against the share of parameters removed (log scale; dashed: dense).",
            "accuracy": "Zero-shot accuracy against the share of parameters removed (dashed: dense).",
            "speedup": "Throughput of the pruned model over the dense one (above 1 is faster)."}[name]


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; margin-bottom: 18px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 7px; text-align: right; }}
th {{ background: #f0f0f0; }}
td:first-child, .facts th, .facts td {{ text-align: left; }}
figure {{ margin: 12px 0; }} img {{ max-width: 100%; }} figcaption {{ font-size: 13px; color: #555; }}
</style></head>
<body>
<h1>{title}</h1>
<table class="facts">{facts}</table>
<h2>Results</h2>
{table}
{failures}
<h2>Plots</h2>
{images}
<script>
window.addEventListener("load", function () {{
  var images = Array.from(document.images);
  document.body.dataset.imagesDecoded = images.filter(function (i) {{ return i.naturalWidth > 0; }}).length;
  document.body.dataset.images = images.length;
}});
</script>
</body></html>
"""


# -- small helpers --------------------------------------------------------------------------------------------


def _dense(cells):
    return next((c for c in cells if c["method"] == DENSE and c["status"] == "ok"), None)


def _corpora(cells) -> list[str]:
    return list(next((c["perplexity"] for c in cells if c["status"] == "ok"), {}))


def _tasks(cells) -> list[str]:
    return list(next(((c.get("zero_shot") or {}).get("tasks", {}) for c in cells if c["status"] == "ok"), {}))


def _task_metric(cells, task: str) -> str:
    for cell in cells:
        row = ((cell.get("zero_shot") or {}).get("tasks", {})).get(task)
        if row:
            return headline_metric(row)
    return "acc"


def _ratio(cell) -> str:
    return "-" if cell["method"] == DENSE else f"{cell['ratio']:.0%}"


def _finite(value):
    return value if isinstance(value, int | float) and math.isfinite(value) else None


def _ppl(value) -> str:
    value = _finite(value)
    return "-" if value is None else (f"{value:.2f}" if value < 1e4 else f"{value:.3g}")


def _number(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _mib(value):
    return None if value is None else value / 2**20
