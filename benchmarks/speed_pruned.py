"""Does pruning buy speed? SmolLM2-135M dense vs two materialised plans, on this machine.

1. ``uniform-30``: 30% of decoder-layer linear weights removed with the same shape in every layer (1 of 3 KV
   groups and 444 of 1536 FFN channels per layer, chosen by weight magnitude). The ideal prefill speed-up is about
   1 / (1 - 0.3 x share of layer compute); the issue asks for at least 1.25x.
2. ``attn-8``: the attention blocks of 8 layers removed (layers 4, 8, ..., 28 and 2; any 8 do for this
   measurement). KV-cache bytes per token must fall by 8/30.

Prefill and decode are timed interleaved per model with prunekit's bench machinery (median of repeats). Writes
``benchmarks/results/speed_pruned.json`` and ``.md`` with the machine and date.

    .venv/bin/python benchmarks/speed_pruned.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import prunekit
from prunekit.evaluation.machine import machine_info
from prunekit.evaluation.speed import benchmark_speed, compare_speed
from prunekit.structure import PruningPlan

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(1, 512), (4, 512)]
ATTENTION_REMOVED = [2, 4, 8, 12, 16, 20, 24, 28]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS / "speed_pruned")
    args = parser.parse_args()

    dense, tokenizer = prunekit.load_model("smollm2-135m")
    adapter = prunekit.adapter_for(dense)
    uniform = prunekit.prune(copy.deepcopy(dense), tokenizer, "magnitude", 0.3, "linear", progress=False)
    attention_plan = PruningPlan.from_block_removals(adapter, attention=ATTENTION_REMOVED, method="manual")
    attention = prunekit.apply_plan(copy.deepcopy(dense), attention_plan)
    models = {"dense": dense, "uniform-30": uniform.model, "attn-8": attention}
    results = {name: benchmark_speed(model, SHAPES, args.decode_tokens, args.repeats, label=name)
               for name, model in models.items()}
    report = {
        "machine": machine_info(),
        "uniform_30_ratios": uniform.metrics["parameters"],
        "uniform_30_layer_shapes": sorted({json.dumps(shape, sort_keys=True) for shape in uniform.plan.layer_shapes()}),
        "results": {name: result.to_dict() for name, result in results.items()},
        "vs_dense": {name: compare_speed(results[name], results["dense"]) for name in ("uniform-30", "attn-8")},
        "expected_kv_ratio_attn_8": (30 - len(ATTENTION_REMOVED)) / 30,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(report))
    print(_markdown(report))


def _markdown(report: dict) -> str:
    lines = ["# Speed of pruned SmolLM2-135M vs dense", "",
             f"Machine: {report['machine'].get('cpu_model')}, {report['machine'].get('cpu_count')} cores, "
             f"torch {report['machine'].get('torch')} ({report['machine'].get('torch_threads')} threads), "
             f"{report['machine'].get('date')}, load average at start {report['machine'].get('load_average')}.",
             "", "| model | parameters | KV bytes/token | " + " | ".join(f"prefill {b}x{s} tok/s" for b, s in SHAPES)
             + " | decode tok/s |", "|---" * (4 + len(SHAPES)) + "|"]
    for name, result in report["results"].items():
        prefill = " | ".join(f"{p['tokens_per_second']['median']:.1f}" for p in result["prefill"])
        decode = result["decode"]["tokens_per_second"]["median"] if result["decode"] else float("nan")
        kv_bytes = result["kv_bytes_per_token"]
        lines.append(f"| {name} | {result['parameters']:,} | {kv_bytes:,.0f} | {prefill} | {decode:.1f} |")
    lines += ["", "Ratios to dense (medians):", ""]
    for name, ratios in report["vs_dense"].items():
        prefill = ", ".join(f"{shape}: {value:.3f}x" for shape, value in ratios["prefill_tokens_per_second"].items())
        lines.append(f"- {name}: prefill {prefill}; decode {ratios['decode_tokens_per_second']:.3f}x; "
                     f"KV bytes/token {ratios['kv_bytes_per_token']:.4f}; parameters {ratios['parameters']:.4f}")
    lines += ["", f"Expected KV-cache ratio for attn-8: {report['expected_kv_ratio_attn_8']:.4f} (22/30).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
