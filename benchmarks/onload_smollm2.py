"""Onloaded against in-memory runs on the real SmolLM2-135M: same results, what is read, what it costs.

SmolLM2's converted fp32 safetensors directory (the one ``prunekit`` caches for the bundled model) is the source of
the onloaded runs, which read it one layer at a time (``prune_onloaded``); the in-memory runs load it whole.

- SlimGPT 20% (32 windows x 512 tokens of the ``mix`` calibration split, seed 0; perplexity before and after on
  16,384 tokens of the ``mix`` evaluation split): the plan, every weight of the saved checkpoints and both
  perplexities are compared for exact equality; time and bytes read are recorded.
- BlockPruner, 2 sub-blocks, on 2 windows x 256 tokens (a small case: the layer-major walk runs every candidate
  through every layer, about 60 full suffixes per step on SmolLM2, and abandons at the head): today's search
  (``search=fast``, in memory), the layer-major walk in memory, and the layer-major walk onloaded. The schedules
  and calibration NLL sums are compared for exact equality; the onloaded run's reads of every layer are counted
  (one per step while the layer still runs, plus the dense pass and the writer), with the time of each.

    .venv/bin/python benchmarks/onload_smollm2.py       # about 10 minutes on 2 CPU cores; run it alone

Results: ``benchmarks/results/onload_smollm2.{json,md}``.
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from _shared import RESULTS, write_results

import prunekit
from prunekit.data import calibration_windows, evaluation_windows
from prunekit.evaluation.machine import machine_info
from prunekit.methods.run import prune, prune_onloaded
from prunekit.models.bundled import ensure_converted
from prunekit.models.shards import ShardedCheckpoint

BLOCKS = 2


def _recording_checkpoints() -> list[ShardedCheckpoint]:
    """Every ShardedCheckpoint created from now on (the first of an onloaded run is its source)."""
    created: list[ShardedCheckpoint] = []
    original = ShardedCheckpoint.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        created.append(self)

    ShardedCheckpoint.__init__ = init
    return created


def slimgpt_case(source: Path, work: Path, tokenizer) -> dict:
    calibration = calibration_windows(tokenizer, "mix", 32 * 512, 512, seed=0)
    evaluation = evaluation_windows(tokenizer, "mix", 512, 16384)
    started = time.perf_counter()
    model, _ = prunekit.load_model(str(source))
    memory = prune(model, tokenizer, "slimgpt", 0.2, calibration=calibration, evaluation=evaluation, progress=False)
    memory.save(work / "memory")
    memory_seconds = time.perf_counter() - started
    del model
    created = _recording_checkpoints()
    started = time.perf_counter()
    metrics = prune_onloaded(source, "slimgpt", work / "onloaded", 0.2, calibration=calibration,
                             evaluation=evaluation, progress=False)
    onloaded_seconds = time.perf_counter() - started
    a, _ = prunekit.load_pruned(work / "memory", with_tokenizer=False)
    b, _ = prunekit.load_pruned(work / "onloaded", with_tokenizer=False)
    first, second = a.state_dict(), b.state_dict()
    return {
        "plan_equal": a.prunekit_plan.to_dict()["layers"] == b.prunekit_plan.to_dict()["layers"],
        "weights_bit_identical": sorted(first) == sorted(second) and all(
            torch.equal(first[name], second[name]) for name in first),
        "perplexity_in_memory": [memory.metrics["perplexity_before"]["perplexity"],
                                 memory.metrics["perplexity_after"]["perplexity"]],
        "perplexity_onloaded": [metrics["perplexity_before"]["perplexity"],
                                metrics["perplexity_after"]["perplexity"]],
        "seconds_in_memory": round(memory_seconds, 1), "seconds_onloaded": round(onloaded_seconds, 1),
        "source_reads": created[0].read_summary(),
    }


def blockpruner_case(source: Path, work: Path, tokenizer) -> dict:
    calibration = calibration_windows(tokenizer, "mix", 2 * 256, 256, seed=0)
    runs = {}
    for label, search in (("fast, in memory", "fast"), ("layer-major, in memory", "layer_major")):
        model, _ = prunekit.load_model(str(source))
        started = time.perf_counter()
        result = prune(model, tokenizer, "blockpruner", blocks=BLOCKS, calibration=calibration, progress=False,
                       search=search)
        runs[label] = {"seconds": round(time.perf_counter() - started, 1),
                       "schedule": result.artifacts["blockpruner_schedule.json"]}
        del model, result
    created = _recording_checkpoints()
    started = time.perf_counter()
    prune_onloaded(source, "blockpruner", work / "bp", blocks=BLOCKS, calibration=calibration, progress=False)
    schedule = json.loads((work / "bp" / "blockpruner_schedule.json").read_text())
    runs["layer-major, onloaded"] = {"seconds": round(time.perf_counter() - started, 1), "schedule": schedule}
    reads = created[0].reads
    layer_reads = [reads[f"model.layers.{index}.mlp.up_proj.weight"] for index in range(30)]
    reference = runs["fast, in memory"]["schedule"]
    return {
        "blocks": BLOCKS, "order": reference["order"],
        "same_schedule": {label: run["schedule"]["order"] == reference["order"] for label, run in runs.items()},
        "same_nll_sums": {label: run["schedule"]["calibration_nll_sum"] == reference["calibration_nll_sum"]
                          for label, run in runs.items()},
        "seconds": {label: run["seconds"] for label, run in runs.items()},
        "branch_executions": {label: sum(run["schedule"]["branch_executions"]) for label, run in runs.items()},
        "head_executions": {label: sum(run["schedule"]["head_executions"]) for label, run in runs.items()},
        "abandoned": {label: sum(run["schedule"]["abandoned"]) for label, run in runs.items()},
        "layer_reads_onloaded": layer_reads, "steps": len(schedule["order"]),
    }


def markdown(payload: dict) -> str:
    slim, block = payload["slimgpt"], payload["blockpruner"]
    lines = [f"# Onloaded against in-memory runs on SmolLM2-135M ({payload['date']})", "",
             f"{payload['machine']['cpu_model']}, {payload['machine']['torch_threads']} threads, fp32.", "",
             "## SlimGPT 20% (32 x 512 calibration tokens, mix)", "",
             f"- plan equal: {slim['plan_equal']}; every weight bit-identical: {slim['weights_bit_identical']}",
             f"- perplexity before / after, in memory: {slim['perplexity_in_memory'][0]:.4f} / "
             f"{slim['perplexity_in_memory'][1]:.4f}; onloaded: {slim['perplexity_onloaded'][0]:.4f} / "
             f"{slim['perplexity_onloaded'][1]:.4f}",
             f"- time (load, prune, evaluate twice, save): in memory {slim['seconds_in_memory']} s, onloaded "
             f"{slim['seconds_onloaded']} s; bytes read from the shards by the onloaded run: "
             f"{slim['source_reads']['bytes_read']:,} (each tensor read {slim['source_reads']['fewest_reads']} to "
             f"{slim['source_reads']['most_reads']} times: the two perplexity walks, the method's walk, the writer)",
             "", f"## BlockPruner, {block['blocks']} sub-blocks (2 x 256 calibration tokens, mix)", "",
             "| search | seconds | branch / head executions (windows) | candidates abandoned | same schedule "
             "| same NLL sums |",
             "|---|---|---|---|---|---|"]
    for label, seconds in block["seconds"].items():
        lines.append(f"| {label} | {seconds} | {block['branch_executions'][label]:,} / "
                     f"{block['head_executions'][label]:,} | {block['abandoned'][label]} | "
                     f"{block['same_schedule'][label]} | {block['same_nll_sums'][label]} |")
    lines += ["", f"Schedule: {block['order']}. Onloaded reads of each layer's tensors (layers 0..29; "
              f"{block['steps']} steps + the dense pass + the writer): {block['layer_reads_onloaded']}.", ""]
    return "\n".join(lines)


def main() -> None:
    source = ensure_converted("smollm2-135m")
    _, tokenizer = prunekit.load_model(str(source))
    with tempfile.TemporaryDirectory(prefix="prunekit-onload-bench-") as scratch:
        work = Path(scratch)
        payload = {"date": datetime.now(UTC).date().isoformat(), "machine": machine_info(),
                   "slimgpt": slimgpt_case(source, work, tokenizer),
                   "blockpruner": blockpruner_case(source, work, tokenizer)}
    write_results(RESULTS / "onload_smollm2", payload, markdown(payload))


if __name__ == "__main__":
    main()
