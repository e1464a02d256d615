"""Pruning a model larger than this machine's memory: Llama-3-8B shapes, layer by layer from disk.

Builds a randomly initialised Llama-architecture model with Llama-3-8B's shapes (32 layers, hidden 4096, 32 query
/ 8 KV heads, FFN 14336, vocabulary 128256, untied head) directly as bf16 safetensors shards (one per decoder
layer; about 16 GB, 32 GB in fp32: more than the 24 GB of the development machine), without ever holding it.
Then prunes it to 20% with SlimGPT and with LLM-BIP through ``prunekit prune --offload disk`` on a small
calibration set (8 windows of 128 tokens of the ``mix`` corpus, tokenized by SmolLM2's tokenizer, whose ids fit
the vocabulary), each in a fresh process, and records wall time, the process's peak RSS, the bytes read from the
shards (counted by prunekit, and the block-device reads of the process from ``/proc/self/io`` after the page
cache was dropped, where that is allowed), and finally loads each pruned checkpoint with ``prunekit.load_pruned``
in bf16 in another process and runs a forward pass.

SlimGPT runs with ``inverse_update=downdate``: re-inverting the 14336-wide FFN Hessian after every channel batch
(the paper's way, about 25 inversions of a minute each per layer here) would take hours on two cores; the
downdate is the same inverse up to rounding. The weights are random, so perplexities would say nothing: the
runs use ``--no-eval``.

    .venv/bin/python benchmarks/onload_llama3_8b.py [--work DIR] [--methods slimgpt,llmbip]

Results: ``benchmarks/results/onload_llama3_8b.{json,md}``. The model (16 GB) and the pruned checkpoints (about
13 GB each; each is deleted after its load check) live under ``--work``, default ``~/.cache/prunekit/llama3-8b``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from _shared import RESULTS, write_results

from prunekit.evaluation.machine import cpu_model

SHAPES = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
          "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
CALIBRATION = ["--calib-tokens", "1024", "--seqlen", "128"]
METHOD_OPTIONS = {"slimgpt": ["--option", "inverse_update=downdate"], "llmbip": []}

# Runs prunekit's CLI, then reports the process's own peak RSS and I/O counters on stderr as one JSON line.
CHILD = """
import json, resource, sys
from prunekit.cli import main
code = main(sys.argv[1:])
io = dict(line.split(": ") for line in open("/proc/self/io").read().split("\\n") if line)
print("PRUNEKIT-CHILD " + json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "io": {key: int(value) for key, value in io.items()}}), file=sys.stderr)
sys.exit(code)
"""

LOAD_CHECK = """
import json, resource, sys, time
import torch, prunekit
started = time.perf_counter()
model, _ = prunekit.load_pruned(sys.argv[1], dtype=torch.bfloat16, with_tokenizer=False)
loaded = time.perf_counter() - started
with torch.no_grad():
    logits = model(torch.arange(1, 17)[None]).logits
print(json.dumps({"load_seconds": round(loaded, 1), "parameters": sum(p.numel() for p in model.parameters()),
                  "logits_shape": list(logits.shape), "finite": bool(torch.isfinite(logits).all()),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def build(directory: Path, layers: int) -> dict:
    """Write the random model as bf16 shards, a tensor at a time (skipped when a complete copy exists)."""
    from transformers import AutoTokenizer, LlamaConfig

    from prunekit.io.streamed import ShardWriter
    from prunekit.models.bundled import ensure_converted
    from prunekit.models.shards import INDEX_NAME, empty_model

    marker = directory / "prunekit-bench-complete.json"
    if marker.is_file() and json.loads(marker.read_text())["layers"] == layers:
        return json.loads(marker.read_text())
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(ensure_converted("smollm2-135m"), local_files_only=True)
    shapes = {**SHAPES, "num_hidden_layers": layers}
    config = LlamaConfig(**shapes, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         dtype="bfloat16")
    shapes = {name: tuple(tensor.shape) for name, tensor in empty_model(config).state_dict().items()}
    groups = [[name for name in shapes if name.startswith("model.embed_tokens.")]]
    groups += [[name for name in shapes if name.startswith(f"model.layers.{index}.")]
               for index in range(config.num_hidden_layers)]
    groups += [[name for name in shapes if name.startswith(("model.norm.", "lm_head."))]]
    writer = ShardWriter(directory, total=len(groups), dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    for names in groups:
        writer.write({name: _random(shapes[name], generator) for name in names})
        print(f"  wrote {names[0]} ... ({len(names)} tensors)", flush=True)
    writer.finish()
    assert (directory / INDEX_NAME).is_file()
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    parameters = sum(int(torch.Size(shape).numel()) for shape in shapes.values())
    summary = {"layers": layers, "bytes": writer.total_size, "shards": len(groups), "parameters": parameters,
               "seconds": round(time.perf_counter() - started, 1)}
    marker.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _random(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Norm weights 1, everything else N(0, 0.02), as Llama's initialisation; generated in bf16-sized pieces."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    return torch.randn(shape, generator=generator).mul_(0.02).to(torch.bfloat16)


def drop_page_cache() -> bool:
    """So that the reads below come from the disk, not from the page cache the build just filled."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def prune(method: str, model: Path, out: Path, report: Path) -> dict:
    dropped = drop_page_cache()
    argv = ["prune", "--model", str(model), "--method", method, "--ratio", "0.2", "--offload", "disk",
            "--save-dtype", "bfloat16", "--no-eval", "--no-progress", "--out", str(out), "--overwrite",
            "--json", str(report), *CALIBRATION, *METHOD_OPTIONS[method]]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{method} failed:\n{done.stderr[-4000:]}")
    child = json.loads(next(line for line in done.stderr.splitlines() if line.startswith("PRUNEKIT-CHILD "))
                       .removeprefix("PRUNEKIT-CHILD "))
    metrics = json.loads(report.read_text())["metrics"]
    return {"method": method, "wall_seconds": round(seconds, 1), "prune_seconds": metrics["prune_seconds"],
            "peak_rss_bytes": child["peak_rss_bytes"], "page_cache_dropped": dropped,
            "block_device_read_bytes": child["io"]["read_bytes"], "source_reads": metrics["source_reads"],
            "parameters": metrics["parameters"], "checkpoint_bytes": _size(out), "options": METHOD_OPTIONS[method]}


def load_check(out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", LOAD_CHECK, str(out)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"loading {out} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _size(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir() if path.is_file())


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def markdown(payload: dict) -> str:
    model = payload["model"]
    lines = [f"# Pruning Llama-3-8B shapes layer by layer ({payload['date']})", "",
             f"{payload['machine']}. Random model: {model['parameters']:,} parameters, {_gib(model['bytes'])} of bf16 "
             f"shards ({model['shards']} files; {_gib(model['bytes'] * 2)} in fp32), built in {model['seconds']} s. "
             f"Calibration: {' '.join(CALIBRATION)} (mix corpus, SmolLM2 tokenizer), computed in fp32, saved in "
             "bf16, `--offload disk`, `--no-eval`.", "",
             "| method | wall | peak RSS | read by prunekit | block-device reads | most reads of a tensor | "
             "ratio (all) | checkpoint | load (bf16) | load peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in payload["runs"]:
        load = run["load"]
        lines.append(f"| {run['method']} {' '.join(run['options'])} | {run['wall_seconds']:.0f} s | "
                     f"{_gib(run['peak_rss_bytes'])} | {_gib(run['source_reads']['bytes_read'])} | "
                     f"{_gib(run['block_device_read_bytes'])} | {run['source_reads']['most_reads']} | "
                     f"{run['parameters']['ratio_all']:.2%} | {_gib(run['checkpoint_bytes'])} | "
                     f"{load['load_seconds']} s, logits {load['logits_shape']} finite={load['finite']} | "
                     f"{_gib(load['peak_rss_bytes'])} |")
    lines += ["", "Peak RSS is the pruning process's own maximum resident set size (`ru_maxrss`). 'Read by prunekit' "
              "counts every tensor read from the shards (the method's pass and the streamed materialisation each "
              "read every layer once); block-device reads are the process's `read_bytes` from `/proc/self/io` "
              "after the page cache was dropped.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "prunekit" / "llama3-8b")
    parser.add_argument("--methods", default="slimgpt,llmbip")
    parser.add_argument("--layers", type=int, default=32, help="fewer layers for a quick check (results not written)")
    args = parser.parse_args()
    model = build(args.work / "dense", args.layers)
    print(f"model: {model}", flush=True)
    runs = []
    for method in args.methods.split(","):
        out = args.work / f"{method}-20"
        run = prune(method, args.work / "dense", out, args.work / f"{method}-20.json")
        run["load"] = load_check(out)
        shutil.rmtree(out)  # 13 GB each; the numbers are what is kept
        print(json.dumps(run, indent=2), flush=True)
        runs.append(run)
    machine = f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    payload = {"date": datetime.date.today().isoformat(), "machine": machine, "model": model, "runs": runs,
               "calibration": CALIBRATION}
    if args.layers == SHAPES["num_hidden_layers"]:
        write_results(RESULTS / "onload_llama3_8b", payload, markdown(payload))
    else:
        print(markdown(payload))


if __name__ == "__main__":
    main()
