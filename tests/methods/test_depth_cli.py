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
from prunekit.methods.depth import Unit, plan_from_units
from tests.conftest import model_directory
from tests.methods.depth_helpers import peaked_model


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    return model_directory(peaked_model("llama", layers=4), tiny_tokenizer, tmp_path / "tiny-llama")


def _prune(capsys, model_dir, out, *extra):
    argv = ["prune", "--model", str(model_dir), "--calib", "sample", "--calib-tokens", "192", "--seqlen", "24",
            "--no-eval", "--no-progress", "--out", str(out), *extra]
    capsys.readouterr()  # drop what fixtures printed
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_line(stderr: str) -> str:
    """The one error line (model-loading progress bars may precede it); no traceback."""
    lines = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("prunekit: error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def test_blockpruner_cli_writes_the_schedule_and_the_checkpoint_reloads(capsys, tmp_path, model_dir):
    out = tmp_path / "pruned"
    code, stdout, err = _prune(capsys, model_dir, out, "--method", "blockpruner", "--blocks", "3",
                               "--block-type", "mix", "--json", str(tmp_path / "m.json"))
    assert code == 0, err
    schedule = json.loads((out / "blockpruner_schedule.json").read_text())
    assert len(schedule["order"]) == 3 and schedule["selected_blocks"] == 3
    assert not (tmp_path / "pruned.blockpruner-state.json").exists()  # deleted once the checkpoint is saved
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["target"] == {"blocks": 3}
    reloaded, _ = prunekit.load_model(str(out))
    dense, _ = prunekit.load_model(str(model_dir))
    adapter = prunekit.adapter_for(dense)
    expected = prunekit.apply_plan(dense, plan_from_units(adapter, [Unit(k, i) for k, i in schedule["order"]]))
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected(input_ids=ids).logits)
        reloaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)  # removed attention: no KV slot


def test_rerunning_a_paused_command_resumes_the_search(capsys, tmp_path, model_dir):
    out = tmp_path / "resumed"
    state = tmp_path / "resumed.blockpruner-state.json"  # the resumable method's state file, beside --out
    code, _, err = _prune(capsys, model_dir, out, "--method", "blockpruner", "--blocks", "3",
                          "--option", "max_steps=2")
    assert code == 2 and "paused after 2 new steps" in _error_line(err)
    assert len(json.loads(state.read_text())["steps"]) == 2 and not out.exists()
    code, _, err = _prune(capsys, model_dir, out, "--method", "blockpruner", "--blocks", "3")
    assert code == 0, err
    assert json.loads((out / "blockpruner_schedule.json").read_text())["resumed_at_steps"] == [2]
    assert not state.exists()  # the checkpoint's schedule holds the same steps
    fresh = tmp_path / "fresh"
    assert _prune(capsys, model_dir, fresh, "--method", "blockpruner", "--blocks", "3")[0] == 0
    order = json.loads((fresh / "blockpruner_schedule.json").read_text())["order"]
    assert json.loads((out / "blockpruner_schedule.json").read_text())["order"] == order


@pytest.mark.parametrize("method,artifact", [("shortgpt", "shortgpt_scores.json"), ("sleb", "sleb_schedule.json")])
def test_layer_methods_cli(capsys, tmp_path, model_dir, method, artifact):
    out = tmp_path / method
    code, stdout, err = _prune(capsys, model_dir, out, "--method", method, "--blocks", "1")
    assert code == 0, err
    assert (out / artifact).is_file()
    reloaded, _ = prunekit.load_model(str(out))
    assert reloaded.config.num_hidden_layers == 3


@pytest.mark.parametrize(
    "extra,pattern",
    [
        (["--method", "blockpruner", "--blocks", "2", "--ratio", "0.1"], "either --ratio or --blocks, not both"),
        (["--method", "blockpruner"], "required: --ratio or --blocks"),
        (["--method", "magnitude"], "required: --ratio"),
        (["--method", "magnitude", "--blocks", "2"], "--blocks applies to the depth methods"),
        (["--method", "sleb", "--blocks", "1", "--block-type", "attn"], "which 'sleb' does not have"),
        (["--method", "blockpruner", "--blocks", "2", "--block-type", "ffn"], "invalid choice: 'ffn'"),
        (["--method", "blockpruner", "--blocks", "0"], "--blocks: must be at least 1"),
        (["--method", "blockpruner", "--blocks", "99"], "more than the 7 sub-blocks"),
    ],
)
def test_bad_depth_flags_exit_2_with_one_line(capsys, tmp_path, model_dir, extra, pattern):
    code, _, err = _prune(capsys, model_dir, tmp_path / "never", *extra)
    assert code == 2 and pattern in _error_line(err), err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_search_resumes_from_its_last_step_with_the_same_schedule(tmp_path, tiny_tokenizer, how):
    """SIGKILL (no cleanup runs) or SIGTERM (cleanup runs) mid-search, then the same command again: it continues
    from the last finished step and matches a fresh run."""
    model_dir = tmp_path / "tiny-llama-8"
    peaked_model("llama", layers=8).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)

    def command(out):
        return [sys.executable, "-m", "prunekit.cli", "prune", "--model", str(model_dir), "--method", "blockpruner",
                "--blocks", "6", "--calib", "sample", "--calib-tokens", "2048", "--seqlen", "32", "--no-eval",
                "--no-progress", "--option", "batch_size=16", "--out", str(out)]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny ops: threads only add contention with this process

    out = tmp_path / "killed"
    state = tmp_path / "killed.blockpruner-state.json"
    process = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (state.exists() and json.loads(state.read_text())["steps"]):
            assert process.poll() is None, "the search ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        process.send_signal(how)
        process.wait()
    assert process.returncode == (143 if how == signal.SIGTERM else -signal.SIGKILL)
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".tmp")]
    done = len(json.loads(state.read_text())["steps"])
    assert 1 <= done < 6 and not out.exists()  # nothing half-written at --out
    assert subprocess.run(command(out), capture_output=True, timeout=240, env=env).returncode == 0
    resumed = json.loads((out / "blockpruner_schedule.json").read_text())
    assert resumed["resumed_at_steps"] == [done]
    fresh = tmp_path / "fresh"
    assert subprocess.run(command(fresh), capture_output=True, timeout=240, env=env).returncode == 0
    expected = json.loads((fresh / "blockpruner_schedule.json").read_text())
    assert resumed["order"] == expected["order"]
    assert resumed["calibration_nll_sum"] == expected["calibration_nll_sum"]


def test_no_progress_hides_bars_but_keeps_the_step_summaries(capsys, tmp_path, model_dir):
    code, _, err = _prune(capsys, model_dir, tmp_path / "quiet", "--method", "blockpruner", "--blocks", "2")
    assert code == 0, err
    steps = [line for line in err.splitlines() if line.startswith("blockpruner step")]
    assert [line.split(":")[0] for line in steps] == ["blockpruner step 1", "blockpruner step 2"], err
    assert all("-> calibration ppl" in line for line in steps)
    assert "cand/s" not in err  # no candidate progress bar
