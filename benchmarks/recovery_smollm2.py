"""LoRA recovery after pruning: SmolLM2-135M pruned by SlimGPT and BlockPruner at 20% and 30%, then ``prunekit
recover`` with LLM-Pruner's recipe scaled to this machine.

- SlimGPT: ``prunekit prune`` with the compare run's settings (2,048 calibration tokens of ``mix``, 256-token
  windows, seed 0). BlockPruner: the committed compare run's plans (``results/compare_smollm2/cells/``), applied to
  the dense model and saved (its search at 30% took 25 minutes there; the plan is what it produced).
- Recovery: LLM-Pruner's recipe (LoRA rank 8, alpha 16, dropout 0.05 on all seven linears, AdamW 1e-4, linear decay,
  256-token examples) on the ``mix`` calibration split, with the budget cut to fit 2 CPUs: ``--steps`` steps of
  ``--batch`` examples (micro-batches of 4) and a warm-up of a tenth of the steps instead of 100 steps of 64.
- Held-out perplexity before and after on the evaluation splits of ``mix`` (by ``recover`` itself) and ``jargon``
  (a corpus in neither calibration nor training), 16,384 tokens in 512-token windows; training tokens, time and
  peak memory growth from the recovery record.

Writes ``benchmarks/results/recovery_smollm2.json`` and ``.md`` with the machine and date.

    .venv/bin/python benchmarks/recovery_smollm2.py [--steps 20 --batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from _shared import compare_run_model, write_results

import prunekit
from prunekit.data.windows import evaluation_windows
from prunekit.evaluation.machine import machine_info

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit")) / "recovery"


def cli(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "prunekit.cli", *argv], check=True)


def pruned_checkpoint(method: str, ratio: float) -> Path:
    out = CACHE / f"{method}-{int(ratio * 100)}"
    if out.exists():
        return out
    if method == "slimgpt":
        cli("prune", "--model", "smollm2-135m", "--method", "slimgpt", "--ratio", str(ratio), "--calib", "mix",
            "--calib-tokens", "2048", "--seqlen", "256", "--no-eval", "--no-progress", "--out", str(out))
        return out
    model, tokenizer = compare_run_model(method, ratio)
    prunekit.save_pruned(model, tokenizer, out, {"metrics": {"source": f"compare_smollm2/cells/{method}@{ratio}"}})
    return out


def jargon_perplexity(directory: Path) -> float:
    model, tokenizer = prunekit.load_model(directory)
    windows = evaluation_windows(tokenizer, "jargon", seqlen=512, max_tokens=16384)
    return prunekit.perplexity(model, windows, progress=False).perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "recovery_smollm2")
    args = parser.parse_args()
    started, rows = time.time(), []
    warmup = max(1, args.steps // 10)
    train_tokens = args.steps * args.batch * 256  # one pass: every example seen once
    for method in ("slimgpt", "blockpruner"):
        for ratio in (0.2, 0.3):
            source = pruned_checkpoint(method, ratio)
            out = CACHE / f"{method}-{int(ratio * 100)}-recovered"
            record_path = CACHE / f"{method}-{int(ratio * 100)}-recovery.json"
            if not record_path.exists():
                cli("recover", "--model", str(source), "--out", str(out), "--overwrite", "--data", "mix",
                    "--train-tokens", str(train_tokens), "--batch-size", str(args.batch), "--micro-batch-size", "4",
                    "--epochs", "1", "--warmup-steps", str(warmup), "--eval", "mix", "--eval-tokens", "16384",
                    "--eval-seqlen", "512", "--no-progress", "--json", str(record_path))
            record = json.loads(record_path.read_text())["recovery"]
            rows.append({"method": method, "ratio": ratio, "steps": record["steps"],
                         "trained_tokens": record["trained_tokens"], "seconds": record["seconds"],
                         "peak_memory_bytes": record["peak_memory_bytes"],
                         "memory_method": record["memory_method"], "recipe": record["recipe"],
                         "mix_before": record["perplexity_before"]["perplexity"],
                         "mix_after": record["perplexity_after"]["perplexity"],
                         "jargon_before": jargon_perplexity(source), "jargon_after": jargon_perplexity(out),
                         "first_loss": record["history"][0]["loss"], "last_loss": record["history"][-1]["loss"]})
            print(json.dumps(rows[-1]), flush=True)
    payload = {"benchmark": "recovery_smollm2", "date": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": machine_info(), "steps": args.steps, "batch": args.batch, "warmup_steps": warmup,
               "seconds": round(time.time() - started, 1), "rows": rows}
    write_results(args.out, payload, markdown(payload))


def markdown(payload: dict) -> str:
    machine = payload["machine"]
    lines = ["# LoRA recovery on SmolLM2-135M\n",
             f"{payload['date']}, {machine.get('cpu_model', '')}, {machine.get('cpu_count')} CPUs, fp32. Recipe "
             f"llm-pruner (rank 8, alpha 16, dropout 0.05, all seven linears, AdamW 1e-4 linear) cut to "
             f"{payload['steps']} steps of {payload['batch']} x 256 tokens, warm-up {payload['warmup_steps']}; "
             "training on the `mix` calibration split; perplexity on 16,384 held-out tokens (512-token windows).\n",
             "| method | ratio | mix before | mix after | jargon before | jargon after | loss first / last | "
             "training tokens | time (s) | peak memory growth (MiB) |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for row in payload["rows"]:
        memory = row["peak_memory_bytes"]
        lines.append(f"| {row['method']} | {row['ratio']:.0%} | {row['mix_before']:.2f} | {row['mix_after']:.2f} | "
                     f"{row['jargon_before']:.2f} | {row['jargon_after']:.2f} | "
                     f"{row['first_loss']:.3f} / {row['last_loss']:.3f} | {row['trained_tokens']:,} | "
                     f"{row['seconds']:.0f} | {'' if memory is None else f'{memory / 2**20:.0f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
