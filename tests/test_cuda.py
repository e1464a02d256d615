"""Every method, evaluation and bench end to end on a CUDA GPU; skipped, with the reason, where there is none.

Run it on an accelerator machine: ``.venv/bin/python -m pytest tests/test_cuda.py -v``. In fp32 a GPU run must
choose what the CPU run chooses (plans equal; depth schedules equal), in bf16 it must run and stay close. Onloaded
runs put each layer on the GPU as it runs.
"""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.data.windows import TokenWindows
from prunekit.evaluation.perplexity import perplexity
from prunekit.methods.run import prune, prune_onloaded
from tests.conftest import make_tiny_model, model_directory, run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU on this machine (run this module on an accelerator machine)")

WIDTH = ["slimgpt", "wanda-sp", "flap", "llmbip", "magnitude", "taylor"]
DEPTH = [("blockpruner", 3), ("sleb", 1), ("shortgpt", 1)]


def _windows(vocab: int, seed: int, count: int = 24, seqlen: int = 32) -> TokenWindows:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (count, seqlen), generator=generator)
    return TokenWindows(ids, "random", "all", seqlen, "none", "random", seed, ids.numel())


@pytest.mark.parametrize("method", WIDTH + ["pgprune"])
def test_width_methods_on_cuda_choose_what_the_cpu_chooses(method):
    options = {"steps": 4, "samples": 2} if method == "pgprune" else {}
    plans = {}
    for device in ("cpu", "cuda"):
        model = make_tiny_model("llama", layers=6).to(device)
        calibration = _windows(model.config.vocab_size, 1)
        result = prune(model, None, method, 0.2, calibration=calibration, progress=False, **options)
        plans[device] = result.plan.to_dict()["layers"]
        assert next(result.model.parameters()).device.type == device
    if method != "pgprune":  # sampled masks: the GPU's floating point may flip a near-tie of the learned scores
        assert plans["cpu"] == plans["cuda"]


@pytest.mark.parametrize("method, blocks", DEPTH)
def test_depth_methods_on_cuda_give_the_cpu_schedule(method, blocks):
    orders = {}
    for device in ("cpu", "cuda"):
        model = make_tiny_model("llama", layers=3).to(device)
        result = prune(model, None, method, blocks=blocks, calibration=_windows(model.config.vocab_size, 1),
                       progress=False)
        orders[device] = result.plan.to_dict()["layers"]
    assert orders["cpu"] == orders["cuda"]


@pytest.mark.parametrize("method", ["slimgpt", "llmbip", "blockpruner"])
def test_bf16_on_cuda_runs_and_stays_close(method):
    model = make_tiny_model("llama", layers=6).to("cuda", torch.bfloat16)
    evaluation = _windows(model.config.vocab_size, 2, count=8)
    target = {"blocks": 2} if method == "blockpruner" else {"ratio": 0.2}
    result = prune(model, None, method, calibration=_windows(model.config.vocab_size, 1), evaluation=evaluation,
                   progress=False, **target)
    assert next(result.model.parameters()).dtype == torch.bfloat16
    after = result.metrics["perplexity_after"]["perplexity"]
    assert torch.isfinite(torch.tensor(after)) and after < 10 * result.metrics["perplexity_before"]["perplexity"]


@pytest.mark.parametrize("method", ["slimgpt", "blockpruner"])
def test_onloaded_pruning_moves_each_layer_to_the_gpu(tmp_path, method):
    model = make_tiny_model("llama", layers=3)
    model.save_pretrained(tmp_path / "dense", max_shard_size="40KB")
    calibration = _windows(model.config.vocab_size, 1)
    target = {"blocks": 2} if method == "blockpruner" else {"ratio": 0.3}
    expected = prune(model, None, method, calibration=calibration, progress=False, **target)
    prune_onloaded(tmp_path / "dense", method, tmp_path / "out", calibration=calibration, device="cuda",
                   progress=False, **target)
    loaded, _ = prunekit.load_pruned(tmp_path / "out", with_tokenizer=False)
    assert loaded.prunekit_plan.to_dict()["layers"] == expected.plan.to_dict()["layers"]


def test_cli_prune_eval_and_bench_on_cuda(capsys, tmp_path, tiny_tokenizer):
    directory = model_directory(make_tiny_model("llama"), tiny_tokenizer, tmp_path / "dense")
    code, _, err = run_cli(capsys, "prune", "--model", directory, "--method", "slimgpt", "--ratio", "0.2",
                           "--out", tmp_path / "out", "--device", "cuda", "--dtype", "bfloat16", "--calib", "sample",
                           "--eval", "sample", "--calib-tokens", "512", "--seqlen", "64", "--eval-tokens", "512",
                           "--no-progress")
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", "--model", tmp_path / "out", "--device", "cuda", "--ppl", "sample",
                             "--seqlen", "64", "--max-tokens", "512", "--no-progress")
    assert code == 0 and "sample" in out, err
    code, out, err = run_cli(capsys, "bench", "--model", tmp_path / "out", "--vs", directory, "--device", "cuda",
                             "--repeats", "2", "--shapes", "1x32", "--decode-tokens", "4")
    assert code == 0 and "cuda" in out, err
    model, _ = prunekit.load_model(tmp_path / "out", device="cuda")
    assert perplexity(model, _windows(model.config.vocab_size, 3, count=4), progress=False).perplexity > 1
