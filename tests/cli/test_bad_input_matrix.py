"""A newcomer's bad inputs: each ends in one line on stderr and exit 2, loses nothing, hangs nowhere, leaves no
temporary file behind. The rows that used to hang or delete run in a subprocess with a deadline."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import prunekit
from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.structure import PruningPlan
from tests.conftest import error_lines, make_tiny_model, run_cli

PRUNE_FAST = ["--calib-tokens", "256", "--seqlen", "32", "--no-eval", "--no-progress"]


def _one_error_line(err: str) -> str:
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("prunekit: error: ") and "Traceback" not in err, err
    return lines[0]


def _cli(*argv, env=None, timeout=120):
    """The command in a fresh process, with a deadline (a hang fails the test instead of the whole run)."""
    return subprocess.run([sys.executable, "-m", "prunekit.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def no_model_loading(monkeypatch):
    """Checks that must happen before any work: loading a model fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(prunekit.api, "load_model", refuse)
    monkeypatch.setattr(prunekit, "load_model", refuse)


def test_overwrite_never_deletes_a_directory_prunekit_did_not_write(capsys, tmp_path, tiny_model_dir):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    code, _, err = run_cli(capsys, "prune", "--model", tiny_model_dir, "--method", "magnitude", "--ratio", "0.2",
                        "--out", precious, "--overwrite", "--no-eval", "--no-progress")
    assert code == 2 and "was not written by prunekit" in _one_error_line(err)
    assert (precious / "thesis.txt").read_text() == "years of work"
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["prune", "--model", tiny_model_dir, "--method", "magnitude", "--no-eval", "--no-progress", "--overwrite"]
    assert run_cli(capsys, *args, "--ratio", "0.2", "--out", empty)[0] == 0  # an empty directory may be replaced
    assert run_cli(capsys, *args, "--ratio", "0.3", "--out", empty)[0] == 0  # and so may a prunekit checkpoint
    assert json.loads((empty / "prunekit.json").read_text())["metrics"]["target"]["ratio"] == 0.3
    exported = tmp_path / "plain"
    assert run_cli(capsys, "export", "--model", empty, "--uniform", "--out", exported)[0] == 0
    assert run_cli(capsys, "export", "--model", empty, "--uniform", "--out", exported, "--overwrite")[0] == 0


def test_an_option_that_used_to_hang_is_refused_at_once(tiny_model_dir, tmp_path):
    started = time.perf_counter()
    done = _cli("prune", "--model", tiny_model_dir, "--method", "slimgpt", "--ratio", "0.2", "--out",
                tmp_path / "out", "--option", "dgs_min=0", *PRUNE_FAST, timeout=60)
    assert done.returncode == 2 and "dgs_min takes an integer >= 1" in _one_error_line(done.stderr)
    assert time.perf_counter() - started < 60
    with pytest.raises(PrunekitError, match="dgs_min"):
        prunekit.prune(make_tiny_model("llama"), None, "slimgpt", 0.2, dgs_min=0)


@pytest.mark.parametrize("damage,pattern", [
    ("not json", "cannot be read as a model config"),
    ("no weights", "cannot load the model in"),
])
def test_a_damaged_model_directory_is_one_line(capsys, tiny_model_dir, damage, pattern):
    if damage == "not json":
        (tiny_model_dir / "config.json").write_text("{ this is not json")
    else:
        (tiny_model_dir / "model.safetensors").unlink()
    code, _, err = run_cli(capsys, "eval", "--model", tiny_model_dir, "--max-tokens", "64", "--seqlen", "32")
    assert code == 2 and pattern in _one_error_line(err)


@pytest.mark.parametrize("where,pattern", [
    ("a file", "is a file, not a directory"),
    ("under a file", "is a file, so no folder can be made under it"),
    ("/proc", "cannot be written: /proc does not accept new files"),
])
def test_unwritable_outputs_are_refused_before_the_work(capsys, tmp_path, tiny_model_dir, no_model_loading, where,
                                                        pattern):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = {"a file": blocker, "under a file": blocker / "ckpt", "/proc": "/proc/prunekit-out"}[where]
    code, _, err = run_cli(capsys, "prune", "--model", tiny_model_dir, "--method", "magnitude", "--ratio", "0.2",
                        "--out", out, "--no-eval")
    assert code == 2 and pattern in _one_error_line(err)


@pytest.mark.parametrize("command", ["prune", "eval", "bench"])
def test_an_unwritable_json_is_refused_before_the_work(capsys, tmp_path, tiny_model_dir, no_model_loading, command):
    extra = {"prune": ["--method", "magnitude", "--ratio", "0.2", "--out", tmp_path / "o", "--no-eval"],
             "eval": [], "bench": []}[command]
    code, _, err = run_cli(capsys, command, "--model", tiny_model_dir, *extra, "--json", "/proc/prunekit.json")
    assert code == 2 and "--json /proc/prunekit.json cannot be written" in _one_error_line(err)


@pytest.mark.parametrize("argv,pattern", [
    (["prune", "--method", "slimgpt", "--ratio", "0.2", "--eval-tokens", "100", "--seqlen", "512"],
     "--eval-tokens 100 is less than one window of 512 tokens"),
    (["prune", "--method", "slimgpt", "--ratio", "0.2", "--calib-tokens", "100", "--seqlen", "512"],
     "--calib-tokens 100 is less than one window of --seqlen 512"),
    (["eval", "--max-tokens", "100", "--seqlen", "512"], "--max-tokens 100 is less than one window of --seqlen 512"),
    (["prune", "--method", "slimgpt", "--ratio", "0.2", "--seed", str(2**70)], "--seed: must be in [-2**63, 2**64)"),
])
def test_inconsistent_token_counts_are_refused_before_the_work(capsys, tmp_path, no_model_loading, argv, pattern):
    out = ["--out", tmp_path / "o"] if argv[0] == "prune" else []
    code, _, err = run_cli(capsys, *argv, *out)
    assert code == 2 and pattern in _one_error_line(err)


def _checkpoint(tmp_path, tokenizer=None):
    model = make_tiny_model("llama", layers=3)
    plan = PruningPlan.keep_all(prunekit.adapter_for(model))
    plan.keep_channels(1, range(40))
    prunekit.save_pruned(prunekit.apply_plan(model, plan), tokenizer, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_a_manifest_without_a_plan_is_one_line(capsys, tmp_path, tiny_tokenizer):
    checkpoint = _checkpoint(tmp_path, tiny_tokenizer)
    manifest = json.loads((checkpoint / "prunekit.json").read_text())
    del manifest["plan"]
    (checkpoint / "prunekit.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, "eval", "--model", checkpoint, "--max-tokens", "64", "--seqlen", "32")
    assert code == 2 and "holds no 'plan'" in _one_error_line(err)


def test_a_plan_that_removes_every_layer_is_refused(capsys, tmp_path, tiny_model_dir):
    model = make_tiny_model("llama", layers=3)
    plan = PruningPlan.keep_all(prunekit.adapter_for(model))
    for index in range(3):
        plan.remove_layer(index)
    (tmp_path / "plan.json").write_text(plan.to_json())
    code, _, err = run_cli(capsys, "save", "--model", tiny_model_dir, "--plan", tmp_path / "plan.json", "--out",
                        tmp_path / "empty-model")
    assert code == 2 and "removes every block of every layer" in _one_error_line(err)
    assert not (tmp_path / "empty-model").exists()


def test_changed_weights_are_caught_by_the_digest(tmp_path):
    checkpoint = _checkpoint(tmp_path)
    weights = checkpoint / "model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")  # safetensors: length, JSON header, data
    data = bytearray(weights.read_bytes())
    start = header + 4096
    data[start:start + 256 * 4] = torch.full((256,), 0.5).numpy().tobytes()  # 256 fp32 weights changed in place
    weights.write_bytes(bytes(data))
    with pytest.raises(PrunekitError, match="model.safetensors does not match the SHA-256") as error:
        prunekit.load_pruned(checkpoint, with_tokenizer=False)
    assert "\n" not in str(error.value)
    prunekit.load_pruned(checkpoint, with_tokenizer=False, verify=False)  # the opt-out for very large models
    assert main(["eval", "--model", str(checkpoint), "--max-tokens", "64", "--seqlen", "32"]) == 2  # the digest
    assert main(["eval", "--model", str(checkpoint), "--no-verify", "--max-tokens", "64", "--seqlen", "32"]) == 2
    assert main(["bench", "--model", str(checkpoint), "--no-verify", "--shapes", "1x8", "--decode-tokens", "0",
                 "--repeats", "1"]) == 0


def test_auto_model_honours_dtype_and_device_map_or_refuses(tmp_path):
    from transformers import AutoModelForCausalLM

    checkpoint = _checkpoint(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.bfloat16, device_map="cpu",
                                                 low_cpu_mem_usage=True)
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).device.type == "cpu"
    assert next(AutoModelForCausalLM.from_pretrained(checkpoint, dtype="float16").parameters()).dtype == torch.float16
    with pytest.raises(PrunekitError, match="cannot honour output_attentions=True"):
        AutoModelForCausalLM.from_pretrained(checkpoint, output_attentions=True)
    if not torch.cuda.is_available():
        with pytest.raises(PrunekitError, match="no CUDA GPU is available"):
            AutoModelForCausalLM.from_pretrained(checkpoint, device_map="cuda")
    with pytest.raises(PrunekitError, match="load onto one device"):
        AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"model": "cpu", "lm_head": "meta"})


def test_help_answers_in_under_a_second_without_torch():
    for argv in (["--help"], ["prune", "--help"], ["eval", "--help"], ["bench", "--help"], ["methods", "--help"]):
        best = min(_timed([sys.executable, "-m", "prunekit.cli", *argv]) for _ in range(3))
        assert best < 1.0, (argv, best)
    done = subprocess.run([sys.executable, "-c", "import sys, prunekit; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False"


def _timed(argv) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "usage:" in done.stdout
    return time.perf_counter() - started


def _wait_for(predicate, process, deadline=120.0):
    started = time.perf_counter()
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.perf_counter() - started < deadline, "the moment to interrupt never came"
        time.sleep(0.02)


def test_sigterm_during_a_disk_offloaded_prune_leaves_nothing_behind(tmp_path, tiny_model_dir):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "prunekit.cli", "prune", "--model", str(tiny_model_dir), "--method", "slimgpt",
         "--ratio", "0.3", "--out", str(out), "--option", "offload=disk", "--calib-tokens", "16384", "--seqlen",
         "64", "--no-eval", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(scratch)})
    _wait_for(lambda: any(scratch.glob("prunekit-activations-*")), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and stderr.strip().splitlines()[-1] == "prunekit: terminated"
    assert list(scratch.iterdir()) == [] and not out.exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".tmp")]


SLOW_SAVE = """
import sys, time
import prunekit.io.checkpoint as checkpoint
from prunekit.cli import main
real = checkpoint.save_file
def slow(*args, **kwargs):
    real(*args, **kwargs)
    print("writing", flush=True)
    time.sleep(60)
checkpoint.save_file = slow
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_a_save_leaves_no_temporary_directory(tmp_path, tiny_model_dir):
    plan = PruningPlan.keep_all(prunekit.adapter_for(make_tiny_model("llama", layers=3)))
    plan.keep_channels(0, range(50))
    (tmp_path / "plan.json").write_text(plan.to_json())
    out = tmp_path / "saved"
    process = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "save", "--model", str(tiny_model_dir), "--plan",
                                str(tmp_path / "plan.json"), "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"  # the weights file is in the temporary directory now
    assert [path for path in tmp_path.iterdir() if path.name.startswith(".tmp-saved-")]
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 143
    assert not out.exists() and not [path for path in tmp_path.iterdir() if path.name.startswith(".tmp")]
