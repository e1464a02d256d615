"""SlimGPT on SmolLM2-135M: held-out perplexity at several ratios for SlimGPT and its ablations.

Variants, all pruning the same structures (KV groups and FFN channels, per-layer unit counts rounded the same way):
- ``slimgpt``: log-increasing schedule with OBS compensation (the method as published, prunekit defaults);
- ``slimgpt-uniform``: the same with a uniform per-layer ratio (the paper's schedule ablation);
- ``slimgpt-no-comp``: the log schedule, units chosen by the same errors, but no compensation of o/down_proj;
- ``magnitude``: L2 norm of each unit's weights, uniform ratio, no data.

Calibration: 128 random windows of 512 tokens from the calibration split of ``--calib`` (seed 0). Evaluation:
the evaluation split of each ``--eval`` corpus (text disjoint from the calibration: by default ``pydocs``
library/ pages, the calibration's own domain, and the ``kjv`` New Testament, another domain), windows of 512
tokens. Ratios are of all parameters.
Writes ``benchmarks/results/slimgpt_ablation.json`` and ``.md`` with the machine and date.

    .venv/bin/python benchmarks/slimgpt_ablation.py                       # the committed run
    .venv/bin/python benchmarks/slimgpt_ablation.py --ratios 0.2 --variants slimgpt --eval-tokens 4096
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time
from pathlib import Path

import prunekit
from prunekit.data import calibration_windows, evaluation_windows
from prunekit.evaluation.machine import machine_info
from prunekit.report import format_table

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "slimgpt": ("slimgpt", {}),
    "slimgpt-uniform": ("slimgpt", {"schedule": "uniform"}),
    "slimgpt-no-comp": ("slimgpt", {"compensate": False}),
    "magnitude": ("magnitude", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--calib", default="pydocs")
    parser.add_argument("--eval", default="pydocs,kjv", help="comma-separated evaluation corpora")
    parser.add_argument("--calib-tokens", type=int, default=128 * 512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=RESULTS / "slimgpt_ablation")
    args = parser.parse_args()

    machine = machine_info()
    dense, tokenizer = prunekit.load_model("smollm2-135m")
    calibration = calibration_windows(tokenizer, args.calib, args.calib_tokens, 512, "random", seed=0)
    evaluation = {name: evaluation_windows(tokenizer, name, 512, args.eval_tokens) for name in args.eval.split(",")}
    dense_ppl = _perplexities(dense, evaluation)
    runs = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for name in args.variants.split(","):
            method, options = VARIANTS[name]
            model = copy.deepcopy(dense)
            started = time.perf_counter()
            method_calibration = calibration if method == "slimgpt" else None
            result = prunekit.prune(model, tokenizer, method, ratio, "all", method_calibration,
                                    seed=0, progress=False, **options)
            seconds = time.perf_counter() - started
            ppl = _perplexities(result.model, evaluation)
            counts = result.metrics["parameters"]
            runs.append({"variant": name, "target_ratio_all": ratio, "ratio_all": counts["ratio_all"],
                         "ratio_layers": counts["ratio_layers"], "parameters": counts["pruned_parameters"],
                         "perplexity": ppl, "prune_seconds": round(seconds, 1),
                         "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})
            print(json.dumps(runs[-1]), flush=True)
            del model, result
            _write(args.out, machine, dense_ppl, calibration, evaluation, runs)  # partial results survive a stop
    print(_markdown(_write(args.out, machine, dense_ppl, calibration, evaluation, runs)))


def _perplexities(model, evaluation: dict) -> dict[str, float]:
    return {
        name: prunekit.perplexity(model, windows, progress=False).perplexity for name, windows in evaluation.items()
    }


def _write(out: Path, machine: dict, dense_ppl: dict, calibration, evaluation, runs: list) -> dict:
    report = {"machine": machine, "model": "smollm2-135m", "dense_perplexity": dense_ppl,
              "calibration": calibration.describe(),
              "evaluation": {name: windows.describe() for name, windows in evaluation.items()}, "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(report))
    return report


def _markdown(report: dict) -> str:
    ratios = sorted({run["target_ratio_all"] for run in report["runs"]})
    variants = list(dict.fromkeys(run["variant"] for run in report["runs"]))
    cell = {(run["variant"], run["target_ratio_all"]): run for run in report["runs"]}
    corpora = list(report["dense_perplexity"])
    tables = []
    for corpus in corpora:
        rows = [[name] + [f"{cell[(name, r)]['perplexity'][corpus]:.2f} ({cell[(name, r)]['ratio_all']:.1%})"
                          if (name, r) in cell else "-" for r in ratios] for name in variants]
        tables += [f"Held-out `{corpus}` (dense {report['dense_perplexity'][corpus]:.2f}); realised ratio of all "
                   "parameters in brackets:", "", "```", format_table(["variant"] + [f"{r:.0%}" for r in ratios], rows),
                   "```", ""]
    machine = report["machine"]
    return "\n".join([
        "# SlimGPT ablation on SmolLM2-135M",
        "",
        f"Machine: {machine.get('cpu_model', '?')}, {machine.get('cpu_count', '?')} cores, "
        f"torch {machine.get('torch', '?')}, "
        f"date {machine.get('date', '?')}, load average at start {machine.get('load_average')}.",
        f"Calibration: {report['calibration']}.",
        "",
        *tables,
        "Prune time and peak RSS per run are in the JSON file.",
        "",
    ])


if __name__ == "__main__":
    main()
