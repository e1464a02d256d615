"""One process against two torchrun processes (gloo, CPU) on SmolLM2-135M: same result, wall time on 2 cores.

Each case runs ``prunekit prune`` on the bundled SmolLM2 twice: as one process with 2 torch threads, and under
``torchrun --nproc_per_node 2`` with 1 thread per process (so both use the machine's 2 cores). The checkpoints
are compared weight by weight (and the depth schedules by their NLL sums); the wall time is the whole command's
(loading, calibration, the search, saving).

- BlockPruner, 2 sub-blocks, 2 windows x 512 tokens (fast search: candidates split, early abandon per process);
- SlimGPT 20%, 16 windows x 512 tokens (two mini-batches of 8, one per process; their statistics exchanged and
  folded in batch order);
- pgprune 20%, 10 steps of K = 4 samples (the samples split, 2 per process).

    .venv/bin/python benchmarks/distributed_smollm2.py     # about 12 minutes; run it alone

Results: ``benchmarks/results/distributed_smollm2.{json,md}``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from _shared import RESULTS, write_results

import prunekit
from prunekit.evaluation.machine import cpu_model

COMMON = ["--model", "smollm2-135m", "--no-eval", "--no-progress", "--offload", "none"]
CASES = {
    "blockpruner fast": ["--method", "blockpruner", "--blocks", "2", "--calib-tokens", "1024", "--seqlen", "512"],
    "slimgpt": ["--method", "slimgpt", "--ratio", "0.2", "--calib-tokens", "8192", "--seqlen", "512"],
    "pgprune": ["--method", "pgprune", "--ratio", "0.2", "--option", "steps=10", "--option", "samples=4",
                "--option", "eval_every=5", "--calib-tokens", "8192", "--seqlen", "256"],
}


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(processes: int, argv: list[str], out: Path, threads: int = 0) -> float:
    """Wall time of the command; threads per process default to sharing the machine's 2 cores."""
    threads = threads or 2 // processes
    if processes == 1:
        command = [sys.executable, "-m", "prunekit.cli", "prune", *argv, "--out", str(out)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={_port()}", "-m", "prunekit.cli", "prune", *argv, "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode:
        raise SystemExit(f"{command} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def compare_checkpoints(first: Path, second: Path) -> dict:
    a, _ = prunekit.load_pruned(first, with_tokenizer=False)
    b, _ = prunekit.load_pruned(second, with_tokenizer=False)
    x, y = a.state_dict(), b.state_dict()
    same_plan = a.prunekit_plan.to_dict()["layers"] == b.prunekit_plan.to_dict()["layers"]
    if not same_plan or sorted(x) != sorted(y):
        return {"same_plan": same_plan, "same_weights": False}
    largest = max(float((x[name] - y[name]).abs().max()) for name in x)
    return {"same_plan": True, "same_weights": largest == 0.0, "largest_weight_difference": largest}


def main() -> None:
    cases = {}
    with tempfile.TemporaryDirectory(prefix="prunekit-distributed-") as scratch:
        for label, argv in CASES.items():
            one, two = Path(scratch) / f"{label}-1", Path(scratch) / f"{label}-2"
            seconds = {"1 process x 2 threads": run(1, COMMON + argv, one),
                       "2 processes x 1 thread": run(2, COMMON + argv, two)}
            case = {"argv": argv, "seconds": {key: round(value, 1) for key, value in seconds.items()},
                    **compare_checkpoints(one, two)}
            if not case["same_weights"]:
                # torch's CPU kernels may reduce in another order with another thread count: compare with one
                # process at the same thread count per process too
                single = Path(scratch) / f"{label}-1x1"
                case["seconds"]["1 process x 1 thread"] = round(run(1, COMMON + argv, single, threads=1), 1)
                case["same_thread_count"] = compare_checkpoints(single, two)
            schedule = one / "blockpruner_schedule.json"
            if schedule.is_file():
                first = json.loads(schedule.read_text())
                second = json.loads((two / "blockpruner_schedule.json").read_text())
                case["same_schedule"] = first["order"] == second["order"]
                case["same_nll_sums"] = first["calibration_nll_sum"] == second["calibration_nll_sum"]
                case["order"] = first["order"]
            cases[label] = case
            print(label, case, flush=True)
    payload = {"date": datetime.now(UTC).date().isoformat(), "machine": f"{cpu_model()}, {os.cpu_count()} CPUs",
               "torch": torch.__version__, "cases": cases}
    lines = [f"# One process against two torchrun processes on SmolLM2-135M ({payload['date']})", "",
             f"{payload['machine']}, torch {payload['torch']}, gloo, fp32. Wall time of the whole command.", "",
             "| case | 1 process x 2 threads | 2 processes x 1 thread | same plan | same weights (largest difference) "
             "| same schedule / NLL sums |",
             "|---|---|---|---|---|---|"]
    notes = []
    for label, case in cases.items():
        times = case["seconds"]
        difference = case.get("largest_weight_difference")
        lines.append(f"| {label} | {times['1 process x 2 threads']} s | {times['2 processes x 1 thread']} s | "
                     f"{case['same_plan']} | {case['same_weights']} ({difference:.1e}) | "
                     f"{case.get('same_schedule', '-')} / {case.get('same_nll_sums', '-')} |")
        if "same_thread_count" in case:
            same = case["same_thread_count"]
            notes.append(f"- {label}: against one process with 1 thread ({times['1 process x 1 thread']} s): same "
                         f"plan {same['same_plan']}, same weights {same['same_weights']} (largest difference "
                         f"{same.get('largest_weight_difference', float('nan')):.1e}). With 2 threads instead of 1, "
                         "torch's CPU kernels sum some reductions in another order.")
    if notes:
        lines += ["", *notes]
    write_results(RESULTS / "distributed_smollm2", payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
