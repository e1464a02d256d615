"""Regression guard for refactors: the same inputs must give the same plans and bit-identical weights.

Records (``--record``) or checks (``--check``, the default) on the real SmolLM2-135M, fp32:

- ``slimgpt`` and ``magnitude`` at 20% of all parameters, calibration 128 random windows x 512 tokens of the
  ``sample`` calibration split (seed 0, the CLI defaults): a SHA-256 of the plan's per-layer keep lists and of every
  tensor of the materialised model;
- the BlockPruner golden case (``../shared/fixtures/blockpruner-golden``): the first ``--golden-steps`` steps, the
  unit removed and the exact calibration NLL sum of each (float repr, compared with ``==``).

Results go to ``benchmarks/results/refactor_regression.json`` (record); the check prints one line per item, writes
``refactor_regression_check.json`` (outcome, timings, machine, date) and exits 1 on any difference.

    .venv/bin/python benchmarks/refactor_regression.py --record     # before the change
    .venv/bin/python benchmarks/refactor_regression.py              # after it
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.data import TokenWindows, calibration_windows
from prunekit.evaluation.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "refactor_regression.json"
CHECK = RESULTS.with_name("refactor_regression_check.json")
GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "blockpruner-golden" / "calibration.txt"


def weight_digests(model: torch.nn.Module) -> dict[str, str]:
    return {name: hashlib.sha256(tensor.detach().contiguous().cpu().numpy().tobytes()).hexdigest()
            for name, tensor in sorted(model.state_dict().items())}


def layers_digest(layers: list[dict]) -> str:
    """SHA-256 of a plan's per-layer keep lists (the lists themselves run to 70,000 lines of JSON)."""
    return hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()


def width_case(method: str) -> dict:
    model, tokenizer = prunekit.load_model("smollm2-135m")
    calibration = calibration_windows(tokenizer, "sample", 128 * 512, 512, "random", seed=0)
    started = time.perf_counter()
    result = prunekit.prune(model, tokenizer, method, 0.2, calibration=calibration, progress=False)
    return {"layers_sha256": layers_digest(result.plan.to_dict()["layers"]), "weights": weight_digests(result.model),
            "seconds": round(time.perf_counter() - started, 1)}


def golden_case(steps: int) -> dict:
    model, tokenizer = prunekit.load_model("smollm2-135m")
    ids = torch.tensor(tokenizer(GOLDEN.read_text(encoding="utf-8"), add_special_tokens=False).input_ids)
    windows = TokenWindows(ids.view(8, 512), "calibration.txt", "all", 512, "none", "sequential", None, 4096)
    started = time.perf_counter()
    result = prunekit.prune(model, tokenizer, "blockpruner", calibration=windows, blocks=steps, progress=False)
    schedule = result.artifacts["blockpruner_schedule.json"]
    return {"order": schedule["order"], "nll_sums": [repr(value) for value in schedule["calibration_nll_sum"]],
            "seconds": round(time.perf_counter() - started, 1)}


def run(steps: int) -> dict:
    return {"slimgpt": width_case("slimgpt"), "magnitude": width_case("magnitude"),
            "blockpruner_golden": golden_case(steps)}


def compare(recorded: dict, current: dict) -> list[str]:
    problems = []
    for method in ("slimgpt", "magnitude"):
        if recorded[method]["layers_sha256"] != current[method]["layers_sha256"]:
            problems.append(f"{method}: the plan differs")
        changed = [name for name, digest in recorded[method]["weights"].items()
                   if current[method]["weights"].get(name) != digest]
        if changed or set(recorded[method]["weights"]) != set(current[method]["weights"]):
            problems.append(f"{method}: {len(changed)} tensors differ (first: {changed[:1]})")
    for key in ("order", "nll_sums"):
        if recorded["blockpruner_golden"][key] != current["blockpruner_golden"][key]:
            problems.append(f"blockpruner golden: {key} differs")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="write the reference instead of checking against it")
    parser.add_argument("--golden-steps", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    current = run(args.golden_steps)
    if args.record:
        RESULTS.write_text(json.dumps({"machine": machine_info(), "date": time.strftime("%Y-%m-%d"),
                                       **current}, indent=1) + "\n")
        print(f"recorded {RESULTS}")
        return 0
    recorded = json.loads(RESULTS.read_text())
    problems = compare(recorded, current)
    for method in ("slimgpt", "magnitude", "blockpruner_golden"):
        print(f"{method}: {current[method]['seconds']} s (recorded: {recorded[method]['seconds']} s)")
    print("\n".join(problems) if problems else "identical: plans, every weight tensor, golden steps and NLL sums")
    CHECK.write_text(json.dumps({"machine": machine_info(), "date": time.strftime("%Y-%m-%d"), "problems": problems,
                                 "seconds": {method: current[method]["seconds"] for method in recorded
                                             if isinstance(recorded[method], dict) and "seconds" in recorded[method]},
                                 "recorded_seconds": {method: recorded[method]["seconds"] for method in
                                                      ("slimgpt", "magnitude", "blockpruner_golden")}}, indent=1)
                     + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
