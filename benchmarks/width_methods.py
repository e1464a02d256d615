"""Width methods on the real SmolLM2-135M: held-out perplexity, pruning time and peak memory at 10/20/30/40%.

Every method gets the same calibration windows (the default ``mix``: 32 random windows x 512 tokens, seed 0) and is
evaluated on the same text: the ``mix`` evaluation split (every calibration corpus's own held-out part) and the
``jargon`` evaluation split, a kind of text (a hacker lexicon) that is in no calibration split. Ratios are shares of
all parameters (``ratio_all``). In the same run, one plain forward pass of the dense model over the calibration
tokens is timed, so each method's cost reads as a multiple of it.

Methods: ``llmbip`` (default: layer range; V1 gated; V2 global; sequential), ``wanda-sp``, ``flap``, ``taylor``,
``magnitude``, ``slimgpt``, each with its defaults (their allocation differs: that is part of each method).
Also, the paper's claim checked at equal allocation (``--claim``): LLM-BIP, Wanda-sp and Taylor each at the layer
range and at the uniform allocation. ``--costs`` reruns every method of the grid at 20% without evaluation, on an
otherwise idle machine, for the pruning time and peak memory the table reports (and Wanda-sp with
``sequential=false``). ``--sample-calibration`` runs SlimGPT, LLM-BIP and FLAP at 20% calibrated on the bundled KJV
sample (the old default) instead of the mix, same token count, same evaluation.

Results go to ``benchmarks/results/width_methods.json`` after every case (a rerun skips finished cases) and a
Markdown table beside it. Run one heavy job at a time:

    .venv/bin/python benchmarks/width_methods.py             # the main grid (about an hour on 2 CPU cores)
    .venv/bin/python benchmarks/width_methods.py --claim     # the equal-allocation comparison
    .venv/bin/python benchmarks/width_methods.py --costs     # quiet-machine timings at 20%
    .venv/bin/python benchmarks/width_methods.py --sample-calibration
"""

from __future__ import annotations

import argparse
import hashlib
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

RESULTS = Path(__file__).resolve().parent / "results" / "width_methods.json"
RATIOS = (0.1, 0.2, 0.3, 0.4)
MAIN = {
    "llmbip": {},
    "llmbip-gated": {"propagation": "gated"},
    "llmbip-global": {"allocation": "global"},
    "llmbip-sequential": {"sequential": True},
    "wanda-sp": {},
    "flap": {},
    "taylor": {},
    "magnitude": {},
    "slimgpt": {},
}
CLAIM = {  # the paper's claim at equal allocation; llmbip, taylor (layer range) and wanda-sp (uniform) are in MAIN
    "wanda-sp@layer_range": {"allocation": "layer_range"},
    "llmbip@uniform": {"allocation": "uniform"},
    "taylor@uniform": {"allocation": "uniform"},
}
COST_ONLY = {"wanda-sp [sequential=false]": {"sequential": False}}  # timed by --costs, not in the perplexity grid
# --sample-calibration: the same methods at 20%, calibrated on the old default (the KJV sample) instead of the mix
SAMPLE_CALIBRATED = {"slimgpt [calibrated on sample]": {}, "llmbip [calibrated on sample]": {},
                     "flap [calibrated on sample]": {}}
CALIBRATION_TOKENS, EVALUATION_TOKENS, SEQLEN = 32 * 512, 16 * 512, 512


def method_of(label: str) -> str:
    label = label.split(" [")[0]
    return label.split("@")[0] if "@" in label else label.removesuffix("-gated").removesuffix(
        "-global").removesuffix("-sequential")


def evaluate(model, windows: dict) -> dict:
    return {name: round(perplexity(model, w, progress=False).perplexity, 3) for name, w in windows.items()}


def forward_seconds(model, calibration) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, calibration.num_windows, 8):
            model(input_ids=calibration.input_ids[start:start + 8], use_cache=False)
    return time.perf_counter() - started


def timed_prune(label: str, options: dict, ratio: float, calibration, forward: float):
    """A fresh SmolLM2 pruned by ``label``; returns the model, the result and its cost (time, passes, peak)."""
    model, tokenizer = prunekit.load_model("smollm2-135m")
    with PeakMemory(torch.device("cpu")) as memory:
        result = prunekit.prune(model, tokenizer, method_of(label), ratio, calibration=calibration, seed=0,
                                progress=False, **options)
    seconds = result.metrics["prune_seconds"]
    cost = {"prune_seconds": seconds, "forward_passes": round(seconds / forward, 2),
            "peak_memory_mib": round(memory.bytes / 2**20, 1)}
    return model, result, cost


def run_case(label: str, options: dict, ratio: float, calibration, windows, forward: float) -> dict:
    model, result, cost = timed_prune(label, options, ratio, calibration, forward)
    layers = [layer.to_dict() for layer in result.plan.layers]
    digest = hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()[:16]
    return {"method": method_of(label), "label": label, "options": options, "ratio": ratio, "plan_sha256": digest,
            "calibration": calibration.source,
            "ratio_all": round(result.metrics["parameters"]["ratio_all"], 4), **cost,
            "perplexity": evaluate(model, windows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claim", action="store_true", help="the equal-allocation comparison instead")
    parser.add_argument("--costs", action="store_true", help="time every method at 20%% without evaluation")
    parser.add_argument("--sample-calibration", action="store_true",
                        help="20%% runs calibrated on the bundled sample instead of the mix")
    parser.add_argument("--only", nargs="*", help="labels to run (default: all of the grid)")
    args = parser.parse_args()
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"cases": []}
    model, tokenizer = prunekit.load_model("smollm2-135m")
    calibration = calibration_windows(tokenizer, "mix", CALIBRATION_TOKENS, SEQLEN, "random", seed=0)
    windows = {"mix": evaluation_windows(tokenizer, "mix", SEQLEN, EVALUATION_TOKENS),
               "jargon (held out)": evaluation_windows(tokenizer, "jargon", SEQLEN, EVALUATION_TOKENS)}
    forward_seconds(model, calibration)  # warm-up
    forward = forward_seconds(model, calibration)
    data.update(machine=machine_info(), date=datetime.now(UTC).isoformat(timespec="seconds"),
                calibration=calibration.describe(), evaluation={k: w.describe() for k, w in windows.items()},
                threads=torch.get_num_threads())
    data.setdefault("dense", evaluate(model, windows))
    data.setdefault("forward_seconds_runs", []).append(round(forward, 2))
    del model
    grid = CLAIM if args.claim else MAIN
    ratios = RATIOS
    if args.sample_calibration:
        grid, ratios = SAMPLE_CALIBRATED, (0.2,)
        calibration = calibration_windows(tokenizer, "sample", CALIBRATION_TOKENS, SEQLEN, "random", seed=0)
    if args.costs:
        data.setdefault("costs", {}).update(measure_costs(calibration, forward, args.only))
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
        write_table(data)
        return
    done = {(case["label"], case["ratio"]) for case in data["cases"]}
    for label, options in grid.items():
        if args.only and label not in args.only:
            continue
        for ratio in ratios:
            if (label, ratio) in done:
                continue
            case = run_case(label, options, ratio, calibration, windows, forward)
            case["forward_seconds"] = round(forward, 2)
            data["cases"].append(case)
            print(json.dumps(case), flush=True)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    write_table(data)


def measure_costs(calibration, forward: float, only: list[str] | None) -> dict:
    """Pruning time, passes and peak memory of each method of the grid at 20% (one run each, no evaluation)."""
    costs = {}
    for label, options in {**MAIN, **COST_ONLY}.items():
        if only and label not in only:
            continue
        costs[label] = {**timed_prune(label, options, 0.2, calibration, forward)[2],
                        "forward_seconds": round(forward, 2)}
        print(label, costs[label], flush=True)
    return costs


def _case(data: dict, label: str, ratio: float) -> dict | None:
    return next((c for c in data["cases"] if c["label"] == label and c["ratio"] == ratio), None)


def write_table(data: dict) -> None:
    """Markdown: perplexity on mix / held-out jargon per ratio with the cost at 20%, then the claim check."""
    costs = data.get("costs", {})
    lines = [f"# Width methods on SmolLM2-135M ({data['date']})", "",
             "Machine: {cpu_model}, {cpu_count} CPUs, torch {torch}, transformers {transformers}, {torch_threads} "
             "threads; one job at a time.".format(**data["machine"]), "",
             f"Dense: mix {data['dense']['mix']}, jargon {data['dense']['jargon (held out)']}. "
             f"One plain forward over the {data['calibration']['tokens']} calibration tokens: "
             f"{min(data['forward_seconds_runs'])} s. Costs at 20% from "
             f"{'the quiet --costs run' if costs else 'the grid run'}.", "",
             "| method | " + " | ".join(f"{r:.0%} mix / jargon" for r in RATIOS) + " | prune s at 20% | passes | "
             "peak MiB |", "|---" * (len(RATIOS) + 4) + "|"]
    for label in dict.fromkeys(case["label"] for case in data["cases"]):
        cells = [f"{case['perplexity']['mix']:.2f} / {case['perplexity']['jargon (held out)']:.2f}"
                 if (case := _case(data, label, ratio)) else "" for ratio in RATIOS]
        cost = costs.get(label) or _case(data, label, 0.2) or {}
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {cost.get('prune_seconds', '')} | "
                     f"{cost.get('forward_passes', '')} | {cost.get('peak_memory_mib', '')} |")
    lines += ["", "## The paper's claim at equal allocation (LLM-BIP against Wanda-sp and Taylor)", ""]
    for allocation, labels in (("layer_range", ("llmbip", "wanda-sp@layer_range", "taylor")),
                               ("uniform", ("llmbip@uniform", "wanda-sp", "taylor@uniform"))):
        for corpus in ("mix", "jargon (held out)"):
            row = []
            for ratio in RATIOS:
                values = {label: case["perplexity"][corpus] for label in labels
                          if (case := _case(data, label, ratio))}
                if len(values) < len(labels):
                    row.append("")
                    continue
                best = min(values, key=values.get)
                row.append(" / ".join(f"{values[label]:.2f}" for label in labels) + f" ({best.split('@')[0]})")
            lines.append(f"- {allocation}, {corpus} ({' / '.join(labels)}): " + "; ".join(
                f"{ratio:.0%} {cell}" for ratio, cell in zip(RATIOS, row, strict=True) if cell))
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
