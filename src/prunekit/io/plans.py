"""Reading a pruning plan from a file: a plan JSON, or a checkpoint's prunekit.json that holds one."""

from __future__ import annotations

import json
from pathlib import Path

from prunekit.errors import PrunekitError
from prunekit.structure.plan import PLAN_FORMAT, PruningPlan


def read_plan(path: str | Path) -> PruningPlan:
    """The plan in ``path``; one-line errors for a missing file, bad JSON or a malformed plan."""
    path = Path(path)
    if not path.is_file():
        raise PrunekitError(f"plan file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise PrunekitError(f"plan file {path} is not readable JSON ({error})") from None
    if isinstance(data, dict) and isinstance(data.get("plan"), dict) and data.get("format") != PLAN_FORMAT:
        data = data["plan"]  # a checkpoint's prunekit.json
    return PruningPlan.from_dict(data)
