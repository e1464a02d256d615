"""Register prunekit's checkpoint format with transformers' Auto classes without importing transformers early.

``import prunekit`` must stay light (``prunekit --help`` answers in well under a second, where importing torch and
transformers takes seconds). So registration happens at once if transformers is already imported, and otherwise
right after transformers' own import finishes, through a one-shot finder on ``sys.meta_path`` that wraps the
loader of the ``transformers`` package (the standard post-import hook pattern).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

log = logging.getLogger("prunekit")


def _register() -> None:
    try:
        from prunekit.io.auto import register_with_transformers

        register_with_transformers()
    except Exception as error:  # never break the user's import of transformers
        log.warning("prunekit could not register its checkpoint format with transformers: %s", error)


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the real loader of ``transformers`` so that registration runs after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module) -> None:
            real_exec(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def register_when_transformers_loads() -> None:
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterTransformers) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformers())
