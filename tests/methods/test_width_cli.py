"""The width methods through ``prunekit prune``: checkpoints that reload exactly, and bad input as one line."""

import json

import pytest
import torch

import prunekit
from prunekit.methods import taylor as taylor_module
from tests.conftest import run_cli
from tests.methods.width_helpers import windows

FAST = ["--calib", "sample", "--calib-tokens", "512", "--seqlen", "32", "--no-eval", "--no-progress"]


def _run(capsys, *argv):
    code, _, err = run_cli(capsys, *argv)
    return code, err


@pytest.mark.parametrize("method,options", [
    ("llmbip", []), ("llmbip", ["propagation=gated", "allocation=global"]), ("wanda-sp", []), ("flap", []),
    ("flap", ["metric=IFV", "allocation=uniform"]), ("taylor", ["variant=vector"]),
])
def test_prune_writes_a_checkpoint_that_reloads_exactly(capsys, tmp_path, tiny_model_dir, method, options):
    out = tmp_path / "out"
    extra = [part for option in options for part in ("--option", option)]
    code, err = _run(capsys, "prune", "--model", tiny_model_dir, "--method", method, "--ratio", "0.2", "--out", out,
                     *FAST, *extra)
    assert code == 0, err
    manifest = json.loads((out / "prunekit.json").read_text())
    assert manifest["plan"]["method"] == method
    assert manifest["metrics"]["parameters"]["ratio_all"] == pytest.approx(0.2, abs=0.05)
    if method == "llmbip":
        assert "toolkit definition" in manifest["plan"]["metrics"]["method_label"]
    if method == "flap":
        assert "down_proj" in manifest["plan"]["added_biases"]  # o_proj too where a layer lost heads
    model, _ = prunekit.load_model(out)
    again, _ = prunekit.load_model(out)
    ids = windows(2, 16)
    assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.mark.parametrize("argv,pattern", [
    (["--method", "flap", "--ratio", "0.2", "--option", "metric=XYZ"], "metric takes one of"),
    (["--method", "llmbip", "--ratio", "0.2", "--option", "propagation=linear"], "propagation takes one of"),
    (["--method", "llmbip", "--ratio", "0.2", "--option", "sequential=true", "--option", "allocation=global"],
     "sequential=true of 'llmbip' needs a per-layer allocation"),
    (["--method", "wanda-sp", "--ratio", "0.2", "--option", "allocation=global"], "add sequential=false"),
    (["--method", "llmbip", "--ratio", "0.6"], "above the cap"),
    (["--method", "taylor", "--ratio", "0.2", "--option", "micro_batch=0"], "micro_batch takes an integer >= 1"),
])
def test_bad_width_input_is_one_line_and_writes_nothing(capsys, tmp_path, tiny_model_dir, argv, pattern):
    out = tmp_path / "out"
    code, err = _run(capsys, "prune", "--model", tiny_model_dir, "--out", out, *FAST, *argv)
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert code == 2 and len(lines) == 1 and pattern in lines[0], err
    assert not out.exists()


def test_taylor_too_large_for_its_micro_batch_is_refused_before_any_work(capsys, tmp_path, tiny_model_dir,
                                                                        monkeypatch):
    monkeypatch.setattr(taylor_module, "available_bytes", lambda device: 1 << 10)
    out = tmp_path / "out"
    code, err = _run(capsys, "prune", "--model", tiny_model_dir, "--method", "taylor", "--ratio", "0.2", "--out",
                     out, *FAST)
    assert code == 2 and "lower micro_batch" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("family,heads,kv_heads", [("llama", 8, 4), ("mistral", 4, 2), ("qwen2", 4, 2),
                                                    ("qwen3", 4, 2), ("gemma3_text", 4, 1)])
@pytest.mark.parametrize("method", ["llmbip", "wanda-sp", "flap", "taylor", "magnitude"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_every_width_method_prunes_every_family(tiny_tokenizer, family, heads, kv_heads, method, allocation):
    from prunekit.data import calibration_windows
    from tests.conftest import make_tiny_model

    model = make_tiny_model(family, heads, kv_heads, layers=4)
    calibration = calibration_windows(tiny_tokenizer, "sample", 64, 16)
    extra = {"sequential": False} if method == "wanda-sp" and allocation == "global" else {}
    result = prunekit.prune(model, None, method, 0.25, calibration=calibration, progress=False,
                            allocation=allocation, **extra)
    parameters = result.metrics["parameters"]
    assert parameters["ratio_all"] == pytest.approx(0.25, abs=0.04)
    for layer in result.plan.layers:
        if kv_heads == 1:  # q-head mode: the one KV head stays, every layer keeps at least one query head
            assert layer.kept_kv_heads == [0] and layer.kept_heads
        else:  # whole KV groups: every kept KV head keeps all its query heads
            assert len(layer.kept_heads) == len(layer.kept_kv_heads) * (heads // kv_heads)
    if allocation == "uniform":  # global may keep every head (FLAP's standardised heads rarely lose to channels)
        assert all(len(layer.kept_heads) < heads for layer in result.plan.layers)
    assert torch.isfinite(model(windows(1, 16)).logits).all()
