"""Why the magnitude baseline collapses on SmolLM2-135M: its channel choice against random channels.

Removes the same number of FFN channels in every layer (194 of 1,536: what ``magnitude`` removes at 10% of all
parameters, where it removes no heads) chosen (a) by magnitude, lowest L2 norm of the channel's gate/up rows and
down column first, (b) uniformly at random (seed 0), and (c) by magnitude but leaving the first 1, 2 or 4 layers
dense. Perplexity on the held-out ``pydocs`` split, 2,048 tokens in 512-token windows. Writes
``benchmarks/results/magnitude_control.{json,md}``.

    .venv/bin/python benchmarks/magnitude_control.py
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

import prunekit
from prunekit.data import evaluation_windows
from prunekit.evaluation.machine import machine_info
from prunekit.methods.magnitude import unit_norms
from prunekit.models.adapters import adapter_for
from prunekit.report import format_table
from prunekit.structure.plan import PruningPlan

RESULTS = Path(__file__).resolve().parent / "results"
REMOVED = 194


def main() -> None:
    machine = machine_info()
    model, tokenizer = prunekit.load_model("smollm2-135m")
    adapter = adapter_for(model)
    windows = evaluation_windows(tokenizer, "pydocs", 512, 2048)
    norms = [unit_norms(layer, adapter)[2] for layer in adapter.decoder_layers(model)]
    width = adapter.intermediate_size
    generator = torch.Generator().manual_seed(0)

    def by_magnitude(index: int) -> list[int]:
        return sorted(norms[index].argsort(descending=True)[: width - REMOVED].tolist())

    choices = {
        "dense": lambda index: list(range(width)),
        "random": lambda index: sorted(torch.randperm(width, generator=generator)[REMOVED:].tolist()),
        "magnitude": by_magnitude,
    }
    for spared in (1, 2, 4):
        choices[f"magnitude, first {spared} layer(s) dense"] = (
            lambda index, spared=spared: list(range(width)) if index < spared else by_magnitude(index))
    results = {}
    for name, keep in choices.items():
        plan = PruningPlan.keep_all(adapter)
        for index in range(adapter.num_layers):
            plan.keep_channels(index, keep(index))
        pruned = prunekit.apply_plan(copy.deepcopy(model), plan)
        results[name] = prunekit.perplexity(pruned, windows, progress=False).perplexity
        print(name, results[name], flush=True)
    report = {"machine": machine, "removed_channels_per_layer": REMOVED, "evaluation": windows.describe(),
              "perplexity": results}
    (RESULTS / "magnitude_control.json").write_text(json.dumps(report, indent=2) + "\n")
    table = format_table(["channels kept by", "pydocs ppl"], [[name, f"{ppl:,.2f}"] for name, ppl in results.items()])
    (RESULTS / "magnitude_control.md").write_text(
        f"# Magnitude vs random channels on SmolLM2-135M ({REMOVED} of {width} per layer)\n\n"
        f"{machine.get('date')}, {machine.get('cpu_model')}. Evaluation: {windows.describe()}.\n\n```\n{table}\n```\n")
    print(table)


if __name__ == "__main__":
    main()
