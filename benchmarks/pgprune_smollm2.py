"""pgprune on the real SmolLM2-135M: held-out perplexity after learning against its own init mask and against
uniform Wanda-sp, with steps, learning rates, wall time, time per step and peak memory.

Calibration: pgprune's default, 2,048 random windows x 128 tokens of the ``mix`` (seed 0); 16 of them are its
held-out (calibration-side) set, the first 128 training windows score the Wanda-sp init. Evaluation: the same text
as the width benchmark (``mix`` evaluation split and the ``jargon`` split, a kind of text in no calibration split,
16 x 512 tokens each). Ratios are shares of all parameters.

Cases (``--only`` picks some; results go to ``benchmarks/results/pgprune_smollm2.json`` after every case and a
rerun skips finished ones; a Markdown table is written beside it):

- ``speed``: seconds per step of the three exact executions (masked, batched, sliced), 8 steps each at 20%;
- ``pg20``, ``pg30``: the default settings (EMA baseline, released estimator, lr 6e-3) at 20% and 30%;
- ``pg20-loo``: 20% with the leave-one-out baseline; ``pg20-short``: 20% with a third of the steps;
- ``pg20-layers``: 20% with layer units (half of the removed parameters as whole layers);
- ``pg20-layer-scope``: 20% with the budget projected per layer (the paper reports the global budget better);
- ``wanda-sp``: the uniform Wanda-sp baseline (its own defaults) at 20% and 30%.

The 7B scripts ran 15,000 steps; on two CPU cores a step takes about 3 s, so these runs are short (``STEPS``).

    .venv/bin/python benchmarks/pgprune_smollm2.py            # every case, about an hour on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

import prunekit
from prunekit.data import calibration_windows, evaluation_windows
from prunekit.evaluation.machine import machine_info
from prunekit.evaluation.memory import PeakMemory
from prunekit.evaluation.perplexity import perplexity
from prunekit.methods import Target, method_info
from prunekit.methods.pgprune.forwards import row_losses
from prunekit.structure.params import measured_ratios
from prunekit.structure.plan import PruningPlan

RESULTS = Path(__file__).resolve().parent / "results" / "pgprune_smollm2.json"
STEPS = 250
EVALUATION_TOKENS, EVALUATION_SEQLEN = 16 * 512, 512
CASES = {
    "pg20": (0.2, {}),
    "wanda-sp": (None, {}),
    "pg30": (0.3, {}),
    "pg20-loo": (0.2, {"baseline": "leave_one_out"}),
    "pg20-layers": (0.2, {"layer_units": True, "steps": 120}),
    "pg20-short": (0.2, {"steps": STEPS // 3}),
    "pg20-layer-scope": (0.2, {"budget_scope": "layer"}),
}


def evaluate(model, windows: dict) -> dict:
    return {name: round(perplexity(model, w, progress=False).perplexity, 3) for name, w in windows.items()}


def evaluate_plan(plan: PruningPlan, windows: dict) -> dict:
    model, _ = prunekit.load_model("smollm2-135m")
    adapter = prunekit.adapter_for(model)
    prunekit.apply_plan(model, plan)
    ratios = measured_ratios(model, adapter)
    return {"ratio_all": round(ratios.ratio_all, 4), "perplexity": evaluate(model, windows)}


def inference_peak(calibration) -> float:
    """Peak memory of one plain forward (with the loss) at pgprune's batch, for comparison."""
    model, _ = prunekit.load_model("smollm2-135m")
    batch = calibration.input_ids[:8]
    with PeakMemory(torch.device("cpu")) as memory, torch.inference_mode():
        row_losses(model(batch, use_cache=False).logits, batch).mean()
    return round(memory.bytes / 2**20, 1)


def run_pgprune(ratio: float, options: dict, calibration, windows: dict) -> dict:
    model, _ = prunekit.load_model("smollm2-135m")
    settings = {"steps": STEPS, "eval_every": 25, **options}
    started = time.perf_counter()
    with PeakMemory(torch.device("cpu")) as memory:
        result = method_info("pgprune").apply_to(model, Target(ratio), calibration, seed=0, progress=False,
                                                 **settings)
    wall = time.perf_counter() - started
    summary = result.plan.metrics["pgprune"]
    init_plan = PruningPlan.from_dict(result.artifacts["pgprune-init-plan.json"])
    return {"ratio": ratio, "options": settings, "wall_seconds": round(wall, 1),
            "peak_memory_mib": round(memory.bytes / 2**20, 1), **{key: summary[key] for key in (
                "steps", "execution", "init_seconds", "learning_seconds", "seconds_per_step", "budgets",
                "heldout_loss_init_mask", "heldout_loss_final_mask", "layer_widths")},
            "heldout_curve": result.artifacts["pgprune-history.json"]["evaluations"],
            "learned": evaluate_plan(result.plan, windows), "init_mask": evaluate_plan(init_plan, windows)}


def run_wanda_sp(windows: dict, tokenizer) -> dict:
    results = {}
    for ratio in (0.2, 0.3):
        model, _ = prunekit.load_model("smollm2-135m")
        calibration = calibration_windows(tokenizer, "mix", 128 * 128, 128, "random", seed=0)
        result = prunekit.prune(model, tokenizer, "wanda-sp", ratio, calibration=calibration, seed=0,
                                progress=False)
        results[str(ratio)] = {"ratio_all": round(result.metrics["parameters"]["ratio_all"], 4),
                               "perplexity": evaluate(model, windows)}
    return results


def measure_speed(calibration) -> dict:
    speeds = {}
    for execution in ("masked", "batched", "sliced"):
        model, _ = prunekit.load_model("smollm2-135m")
        result = method_info("pgprune").apply_to(model, Target(0.2), calibration, seed=0, progress=False, steps=8,
                                                 init="uniform", eval_every=1000, execution=execution)
        speeds[execution] = result.plan.metrics["pgprune"]["seconds_per_step"]
        print(execution, speeds[execution], flush=True)
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="cases to run (default: all)")
    args = parser.parse_args()
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"cases": {}}
    model, tokenizer = prunekit.load_model("smollm2-135m")
    calibration = calibration_windows(tokenizer, "mix", 2048 * 128, 128, "random", seed=0)
    windows = {"mix": evaluation_windows(tokenizer, "mix", EVALUATION_SEQLEN, EVALUATION_TOKENS),
               "jargon (held out)": evaluation_windows(tokenizer, "jargon", EVALUATION_SEQLEN, EVALUATION_TOKENS)}
    data.update(machine=machine_info(), date=datetime.now(UTC).isoformat(timespec="seconds"),
                calibration=calibration.describe(), threads=torch.get_num_threads(), seed=0)
    data.setdefault("dense", evaluate(model, windows))
    del model
    data.setdefault("inference_peak_memory_mib", inference_peak(calibration))
    for name in ["speed", *CASES]:
        if (args.only and name not in args.only) or name in data["cases"]:
            continue
        if name == "speed":
            case = measure_speed(calibration)
        elif name == "wanda-sp":
            case = run_wanda_sp(windows, tokenizer)
        else:
            ratio, options = CASES[name]
            case = run_pgprune(ratio, options, calibration, windows)
        data["cases"][name] = case
        print(name, json.dumps(case)[:600], flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    write_table(data)


def write_table(data: dict) -> None:
    cases = data["cases"]
    lines = [f"# pgprune on SmolLM2-135M ({data['date']})", "",
             "Machine: {cpu_model}, {cpu_count} CPUs, torch {torch}, {torch_threads} threads; one job at a "
             "time.".format(**data["machine"]), "",
             f"Dense: mix {data['dense']['mix']}, jargon {data['dense']['jargon (held out)']}. Plain inference "
             f"peak at batch 8 x 128 (with the loss): {data['inference_peak_memory_mib']} MiB.", ""]
    if "speed" in cases:
        lines += ["Seconds per step (K = 2 samples of 8 x 128 tokens): " + ", ".join(
            f"{name} {value}" for name, value in cases["speed"].items()), ""]
    lines += ["| case | ratio_all | steps | lr | init mask mix / jargon | learned mix / jargon | held-out loss "
              "init -> learned | s/step | wall s | peak MiB |", "|---" * 10 + "|"]
    for name, case in cases.items():
        if name in ("speed", "wanda-sp"):
            continue
        options = case["options"]
        init, learned = case["init_mask"]["perplexity"], case["learned"]["perplexity"]
        lines.append(
            f"| {name} | {case['learned']['ratio_all']:.4f} | {case['steps']} | "
            f"{options.get('lr_heads', 6e-3):g} | {init['mix']:.2f} / {init['jargon (held out)']:.2f} | "
            f"{learned['mix']:.2f} / {learned['jargon (held out)']:.2f} | {case['heldout_loss_init_mask']:.4f} -> "
            f"{case['heldout_loss_final_mask']:.4f} | {case['seconds_per_step']} | {case['wall_seconds']} | "
            f"{case['peak_memory_mib']} |")
    if "wanda-sp" in cases:
        lines += ["", "Uniform Wanda-sp (its defaults, 128 x 128 mix tokens): " + ", ".join(
            f"{float(ratio):.0%} (ratio_all {case['ratio_all']:.4f}): mix {case['perplexity']['mix']:.2f} / jargon "
            f"{case['perplexity']['jargon (held out)']:.2f}" for ratio, case in cases["wanda-sp"].items())]
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
