"""torchrun with 2 CPU processes on gloo gives the one-process result (depth candidates and pgprune's mask samples
split across the processes); only the first process writes; a process that dies is one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import prunekit
from tests.conftest import make_tiny_model, model_directory

COMMON = ["--calib", "sample", "--seqlen", "64", "--no-eval", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _prune(processes: int, *argv, check: bool = True) -> subprocess.CompletedProcess:
    if processes == 1:
        command = [sys.executable, "-m", "prunekit.cli", "prune", *map(str, argv)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={_free_port()}", "-m", "prunekit.cli", "prune", *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    return model_directory(make_tiny_model("llama", layers=3), tiny_tokenizer, tmp_path / "dense")


def _weights(directory):
    model, _ = prunekit.load_pruned(directory, with_tokenizer=False)
    return model.state_dict()


@pytest.mark.parametrize("method, extra", [
    ("blockpruner", ["--blocks", "3", "--calib-tokens", "1024"]),
    ("blockpruner", ["--blocks", "3", "--calib-tokens", "1024", "--option", "search=layer_major"]),
    ("sleb", ["--blocks", "1", "--calib-tokens", "1024"]),
    ("pgprune", ["--ratio", "0.2", "--option", "steps=6", "--option", "samples=4", "--option", "eval_every=3",
                 "--calib-tokens", "2048"]),
])
def test_two_gloo_processes_give_the_one_process_result(tmp_path, model_dir, method, extra):
    _prune(1, "--model", model_dir, "--method", method, "--out", tmp_path / "one", *extra, *COMMON)
    done = _prune(2, "--model", model_dir, "--method", method, "--out", tmp_path / "two", *extra, *COMMON)
    assert done.stdout.count("saved:") == 1  # only the first process prints and writes
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert sorted(one) == sorted(two) and all(torch.equal(one[name], two[name]) for name in one)
    if method != "pgprune":
        schedule = f"{method}_schedule.json"
        first, second = (json.loads((tmp_path / run / schedule).read_text()) for run in ("one", "two"))
        assert first["order"] == second["order"] and first["calibration_nll_sum"] == second["calibration_nll_sum"]
    else:
        history = [json.loads((tmp_path / run / "prunekit.json").read_text())["plan"] for run in ("one", "two")]
        assert history[0]["layers"] == history[1]["layers"]
    assert not list(tmp_path.glob("*-state.json"))


@pytest.mark.parametrize("method, extra", [
    ("slimgpt", []),
    ("slimgpt", ["--calib-tokens", "1536"]),  # 3 batches of 8 windows: the second process sits out the last round
    ("wanda-sp", []),
    ("flap", []),
    ("llmbip", ["--option", "allocation=global"]),
])
def test_layer_wise_methods_split_the_windows_and_combine_their_statistics(tmp_path, model_dir, method, extra):
    argv = ["--model", model_dir, "--method", method, "--ratio", "0.2", "--calib-tokens", "2048", *extra, *COMMON]
    _prune(1, *argv, "--out", tmp_path / "one")
    _prune(2, *argv, "--out", tmp_path / "two")
    plans = [json.loads((tmp_path / run / "prunekit.json").read_text())["plan"]["layers"] for run in ("one", "two")]
    assert plans[0] == plans[1]
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    # the batches' contributions are folded in batch order in both runs: the same bits
    assert sorted(one) == sorted(two) and all(torch.equal(one[name], two[name]) for name in one)


def test_fewer_batches_than_processes_is_one_line(tmp_path, model_dir):
    done = _prune(2, "--model", model_dir, "--method", "wanda-sp", "--ratio", "0.2", "--calib-tokens", "512",
                  "--out", tmp_path / "two", *COMMON, check=False)
    assert done.returncode != 0
    assert "1 calibration batch cannot be split across 2 processes" in done.stderr
    assert not (tmp_path / "two").exists()


def test_a_process_that_dies_is_one_line_and_writes_nothing(tmp_path, model_dir):
    # A sitecustomize hook ends the second process abruptly in its second collective (step 1 of the search), while
    # the first process waits for it.
    hook = tmp_path / "hook" / "sitecustomize.py"
    hook.parent.mkdir()
    hook.write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import torch.distributed as dist\n"
        "    original, calls = dist.all_gather_object, []\n"
        "    def dying(*args, **kwargs):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 2:\n"
        "            os._exit(9)\n"
        "        return original(*args, **kwargs)\n"
        "    dist.all_gather_object = dying\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               "-m", "prunekit.cli", "prune", "--model", str(model_dir), "--method", "blockpruner", "--blocks", "3",
               "--out", str(tmp_path / "killed"), "--calib-tokens", "1024", *COMMON]
    env = {**os.environ, "PYTHONPATH": f"{hook.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode != 0
    # torchrun's agent stops the surviving process (SIGTERM) when it sees the other die; without the agent, the
    # survivor's next collective fails. Either way the survivor says so in one line and writes nothing.
    ours = [line for line in done.stderr.splitlines() if line.startswith("prunekit:") and "--offload" not in line]
    assert ours in (["prunekit: terminated"], ["prunekit: error: a process of the torchrun group failed or left"]) \
        or (len(ours) == 1 and "failed or left" in ours[0]), done.stderr[-3000:]
    assert not (tmp_path / "killed").exists() and not list(tmp_path.glob(".tmp-*"))
