"""LoRA recovery: it learns (loss falls), merges into weights that reload exactly, resumes to the same weights as an
uninterrupted run, refuses a state made with other settings, and handles instruction files and bad input in one
line."""

from __future__ import annotations

import json

import pytest
import torch

import prunekit
from prunekit.errors import PrunekitError
from prunekit.recovery import build_recipe, recover
from prunekit.recovery import train as train_module
from prunekit.recovery.examples import IGNORE, instruction_examples
from tests.conftest import error_lines, make_tiny_model, run_cli
from tests.structure.common import mixed_plan

FAST = ["--batch-size", "4", "--micro-batch-size", "2", "--seqlen", "32", "--train-tokens", "512", "--lr", "5e-3",
        "--warmup-steps", "0", "--eval-tokens", "256", "--eval-seqlen", "64", "--no-progress"]


@pytest.fixture
def pruned_dir(tmp_path, tiny_tokenizer):
    model = make_tiny_model("llama", 4, 2, layers=5)
    prunekit.apply_plan(model, mixed_plan(prunekit.adapter_for(model)))
    return prunekit.save_pruned(model, tiny_tokenizer, tmp_path / "pruned", {"metrics": {"note": "pruned"}})


def _run(capsys, *argv):
    code, out, err = run_cli(capsys, *argv)
    return code, out, error_lines(err)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_recover_learns_merges_and_reloads_exactly(capsys, tmp_path, pruned_dir):
    out = tmp_path / "recovered"
    code, stdout, _ = _run(capsys, "recover", "--model", pruned_dir, "--out", out, "--data", "sample",
                           "--eval", "sample", "--epochs", "3", "--json", tmp_path / "r.json", *FAST)
    assert code == 0, stdout
    record = json.loads((tmp_path / "r.json").read_text())["recovery"]
    losses = [entry["loss"] for entry in record["history"]]
    assert record["steps"] == len(losses) == 12  # 512 / 32 = 16 windows, 4 per step, 3 epochs
    assert sum(losses[-3:]) < sum(losses[:3])  # it learns
    assert record["perplexity_after"]["perplexity"] < record["perplexity_before"]["perplexity"]
    assert record["trained_tokens"] == 12 * 4 * 32
    assert "before recovery" in stdout and "saved:" in stdout
    manifest = json.loads((out / "prunekit.json").read_text())
    assert manifest["metrics"] == {"note": "pruned"} and manifest["recovery"]["recipe"]["rank"] == 8
    assert manifest["plan"]["weights_edited"] is True
    assert not (tmp_path / "recovered.recover-state").exists()
    reloaded, _ = prunekit.load_pruned(out)
    original, _ = prunekit.load_pruned(pruned_dir)
    ids = torch.arange(3, 40)[None]
    assert not torch.allclose(_logits(reloaded, ids), _logits(original, ids))  # the merge changed the weights
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    # The saved weights are the merged in-memory ones: recovering again in memory gives identical logits.
    model, tokenizer = prunekit.load_pruned(pruned_dir)
    from prunekit.recovery.examples import corpus_examples

    examples = corpus_examples(tokenizer, "sample", 512, 32, 0, "sample")
    recipe = build_recipe("llm-pruner", batch_size=4, micro_batch_size=2, seqlen=32, learning_rate=5e-3,
                          warmup_steps=0, epochs=3)
    result = recover(model, examples, recipe, pad_id=0, seed=0, progress=False)
    torch.testing.assert_close(_logits(result.model, ids), _logits(reloaded, ids), rtol=0, atol=0)


def test_an_interrupted_run_resumes_to_the_same_weights(capsys, tmp_path, pruned_dir, monkeypatch):
    argv = ["recover", "--model", pruned_dir, "--data", "sample", "--epochs", "2", "--save-every", "3", "--no-eval",
            *FAST]
    assert _run(capsys, *argv, "--out", tmp_path / "straight")[0] == 0
    real_step, calls = train_module._optimizer_step, {"count": 0}

    def interrupted(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 5:  # after the state saved at step 3
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "_optimizer_step", interrupted)
    code, _, lines = _run(capsys, *argv, "--out", tmp_path / "resumed")
    assert code != 0 and not (tmp_path / "resumed").exists()
    state = tmp_path / "resumed.recover-state"
    assert [path.name for path in state.iterdir() if path.name.startswith("step-")] == ["step-000003"]
    monkeypatch.setattr(train_module, "_optimizer_step", real_step)
    code, stdout, _ = _run(capsys, *argv, "--out", tmp_path / "resumed")
    assert code == 0 and "resumed from step 3" in stdout
    straight, _ = prunekit.load_pruned(tmp_path / "straight")
    resumed, _ = prunekit.load_pruned(tmp_path / "resumed")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not state.exists()


def test_a_state_made_with_other_settings_is_refused(capsys, tmp_path, pruned_dir, monkeypatch):
    argv = ["recover", "--model", pruned_dir, "--out", tmp_path / "r", "--data", "sample", "--epochs", "2",
            "--save-every", "2", "--no-eval", *FAST]

    real, calls = train_module._optimizer_step, {"count": 0}

    def stop_at_three(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "_optimizer_step", stop_at_three)
    _run(capsys, *argv)
    monkeypatch.setattr(train_module, "_optimizer_step", real)
    code, _, lines = _run(capsys, *argv, "--rank", "4")
    assert code == 2 and len(lines) == 1 and "made with other settings (recipe)" in lines[0]


def test_instruction_records_train_only_on_answers(tmp_path, tiny_tokenizer):
    path = tmp_path / "instructions.jsonl"
    records = [{"instruction": "Name a colour.", "output": "Blue."},
               {"instruction": "Add", "input": "2 and 3", "output": "5"},
               {"prompt": "Q: sky? A:", "response": " blue"}]
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n\n")
    examples = instruction_examples(tiny_tokenizer, path, 64)
    assert len(examples) == 3
    for ids, labels, record in zip(examples.input_ids, examples.labels, records, strict=True):
        answer = record.get("output", record.get("response"))
        targets = ids[labels != IGNORE]
        assert targets[-1] == tiny_tokenizer.eos_token_id
        assert tiny_tokenizer.decode(targets[:-1]).strip() == answer.strip()
    everything = instruction_examples(tiny_tokenizer, path, 64, train_on_inputs=True)
    assert all((labels != IGNORE).all() for labels in everything.labels)
    model = make_tiny_model("llama", 4, 2, layers=5)
    prunekit.apply_plan(model, mixed_plan(prunekit.adapter_for(model)))
    recipe = build_recipe("slimgpt", batch_size=2, micro_batch_size=1, seqlen=64)
    result = recover(model, examples, recipe, pad_id=0, progress=False)
    assert result.steps == 2 and result.target_tokens == examples.target_tokens


@pytest.mark.parametrize("argv, pattern", [
    (["--model", "DENSE"], "recover fine-tunes a pruned checkpoint"),
    (["--recipe", "llm-pruner", "--target-modules", "q_proj,lm_head"], "--target-modules must name some of"),
    (["--batch-size", "6", "--micro-batch-size", "4"], "not a multiple of --micro-batch-size"),
    (["--instructions", "MISSING.jsonl"], "does not exist"),
    (["--instructions", "BAD.jsonl"], r"BAD.jsonl:2 is not JSON"),
    (["--data", "no-such-corpus"], "no-such-corpus"),
    (["--dropout", "1.5"], "--dropout must be in"),
])
def test_bad_input_is_one_line(capsys, tmp_path, pruned_dir, tiny_model_dir, argv, pattern):
    (tmp_path / "BAD.jsonl").write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    replace = {"DENSE": tiny_model_dir, "MISSING.jsonl": tmp_path / "missing.jsonl",
               "BAD.jsonl": tmp_path / "BAD.jsonl"}
    argv = [replace.get(arg, arg) for arg in argv]
    model = [] if "--model" in argv else ["--model", pruned_dir]
    code, _, lines = _run(capsys, "recover", *model, "--out", tmp_path / "out", "--no-eval", "--no-progress", *argv)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("prunekit: error: "), lines
    assert __import__("re").search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_recover_refuses_a_model_without_a_plan():
    recipe = build_recipe("llm-pruner")
    with pytest.raises(PrunekitError, match="carries no pruning plan"):
        recover(make_tiny_model("llama"), None, recipe, pad_id=0)
