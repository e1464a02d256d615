"""Resumable recovery: the LoRA weights, optimizer and scheduler state, RNG and loss history after a step.

Each saved step is a folder ``step-NNNNNN`` under the state directory, built under a temporary name and renamed
into place (so a folder that exists is complete); older steps are deleted once a newer one is in place. Tensors
are safetensors and everything else JSON: nothing is unpickled when resuming. A state made with other settings is
refused in one line rather than mixed into this run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prunekit._atomic import atomic_directory
from prunekit.errors import PrunekitError

PREFIX = "step-"


def latest_step(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    steps = sorted(path for path in folder.iterdir() if path.is_dir() and path.name.startswith(PREFIX))
    return steps[-1] if steps else None


def save_state(folder: Path, step: int, trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
               scheduler: Any, settings: dict[str, Any], history: list[dict[str, float]]) -> Path:
    """Write the state after ``step`` optimizer steps; returns its folder."""
    target = folder / f"{PREFIX}{step:06d}"
    optimizer_state = optimizer.state_dict()
    tensors = {f"{index}.{key}": value for index, entries in optimizer_state["state"].items()
               for key, value in entries.items()}
    with atomic_directory(target) as staging:
        save_file({name: parameter.detach().contiguous() for name, parameter in trainable.items()},
                  staging / "adapter.safetensors")
        save_file(tensors, staging / "optimizer.safetensors")
        save_file({"torch": torch.get_rng_state()}, staging / "rng.safetensors")
        body = {"step": step, "settings": settings, "history": history, "param_groups": optimizer_state["param_groups"],
                "scheduler": _plain(scheduler.state_dict())}
        (staging / "state.json").write_text(json.dumps(body, indent=1) + "\n")
        (staging / "prunekit.json").write_text("{}\n")  # marks it as prunekit's (a rerun may replace it)
    for older in folder.iterdir():
        if older.is_dir() and older.name.startswith(PREFIX) and older != target:
            shutil.rmtree(older, ignore_errors=True)
    return target


def load_state(path: Path, trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
               scheduler: Any, settings: dict[str, Any]) -> tuple[int, list[dict[str, float]]]:
    """Restore a saved step into the live objects; returns (step, history)."""
    try:
        body = json.loads((path / "state.json").read_text())
        adapter = load_file(path / "adapter.safetensors")
        tensors = load_file(path / "optimizer.safetensors")
        rng = load_file(path / "rng.safetensors")["torch"]
    except (OSError, ValueError, KeyError) as error:
        raise PrunekitError(f"recovery state {path} cannot be read ({type(error).__name__}); delete it to start "
                            "over") from None
    if body.get("settings") != settings:
        changed = sorted(key for key in {**settings, **body.get("settings", {})}
                         if settings.get(key) != body.get("settings", {}).get(key))
        raise PrunekitError(f"recovery state {path.parent} was made with other settings ({', '.join(changed)}); "
                            "rerun with the same options, or delete it to start over")
    if set(adapter) != set(trainable):
        raise PrunekitError(f"recovery state {path} holds other LoRA tensors than this model has; delete it")
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(adapter[name])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": body["param_groups"]})
    scheduler.load_state_dict(body["scheduler"])
    torch.set_rng_state(rng)
    return int(body["step"]), list(body["history"])


def _plain(value: Any) -> Any:
    """A scheduler's state as JSON (its lambdas are functions, stored as None and rebuilt by the caller)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return None
