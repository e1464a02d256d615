"""Pieces the benchmark scripts share: a depth plan of the committed compare run, and writing results files."""

from __future__ import annotations

import json
from pathlib import Path

import prunekit
from prunekit.structure import PruningPlan

RESULTS = Path(__file__).resolve().parent / "results"


def compare_run_model(method: str, ratio: float):
    """Dense SmolLM2 with the block removals of the committed compare run's cell ``method@ratio`` (a depth method:
    BlockPruner, SLEB, ShortGPT), and its tokenizer. Their searches take up to 25 minutes; the plan is what they
    produced."""
    cell = json.loads((RESULTS / "compare_smollm2" / "cells" / f"{method}@{ratio}.json").read_text())
    model, tokenizer = prunekit.load_model("smollm2-135m")
    plan = PruningPlan.keep_all(prunekit.adapter_for(model), method=method, settings=cell["settings"],
                                seed=cell["seed"])
    for layer in cell["layers"]:
        if not layer["attention"]:
            plan.remove_attention(layer["layer"])
        if not layer["mlp"]:
            plan.remove_mlp(layer["layer"])
    for index in cell["removed_layers"]:
        plan.remove_layer(index)
    return prunekit.apply_plan(model, plan), tokenizer


def write_results(out: Path, payload: dict, markdown: str) -> None:
    """``out``.json and ``out``.md, and the Markdown on the console."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
