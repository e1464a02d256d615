import json
import subprocess
import sys

import pytest

from prunekit.cli import build_parser, main
from tests.conftest import make_tiny_model, requires_smollm2


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_every_subcommand_and_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    commands = build_parser()._subparsers._group_actions[0].choices
    assert all(name in top for name in commands)
    for name, sub in commands.items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        for action in sub._actions:
            assert all(option in text for option in action.option_strings)
            assert action.help, f"{name} {action.option_strings} has no help"


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["eval", "--model", "not-a-model"], "unknown model 'not-a-model'"),
        (["eval", "--model", "./missing-dir"], "does not exist"),
        (["eval", "--ppl", "no-such-corpus"], "unknown corpus 'no-such-corpus'"),
        (["eval", "--seqlen", "0"], "--seqlen: must be at least 1"),
        (["eval", "--max-tokens", "many"], "--max-tokens: 'many' is not an integer"),
        (["eval", "--dtype", "int3"], "unknown dtype 'int3'"),
        (["eval", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["prune", "--method", "slimgpt", "--ratio", "1.5", "--out", "x"], "--ratio 1.5 is out of range"),
        (["prune", "--method", "nope", "--ratio", "0.2", "--out", "x"], "unknown method 'nope'"),
        (["prune", "--method", "slimgpt", "--ratio", "0.2", "--out", "x", "--option", "dampign=0.1"],
         "has no option 'dampign'"),
        (["prune", "--method", "slimgpt", "--ratio", "0.2", "--out", "x", "--option", "damping=lots"],
         "damping takes a number >= 0"),
        (["prune", "--method", "slimgpt", "--out", "x"], "--ratio"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv, pattern):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("prunekit: error: ")
    assert pattern in lines[0]
    assert "Traceback" not in err


def test_eval_writes_json(capsys, tmp_path, tiny_model_dir):
    out_file = tmp_path / "results" / "eval.json"
    code, out, _ = _run(capsys, "eval", "--model", str(tiny_model_dir), "--ppl", "sample", "--seqlen", "32",
                        "--max-tokens", "128", "--json", str(out_file), "--no-progress")
    assert code == 0
    report = json.loads(out_file.read_text())
    assert report["model"] == str(tiny_model_dir)
    assert report["params"] == sum(p.numel() for p in make_tiny_model("llama").parameters())
    assert report["details"]["sample"]["windows"] == 4
    assert f"{report['perplexity']['sample']:.4f}" in out


def test_eval_names_a_file_corpus_by_its_file_name(capsys, tmp_path, tiny_model_dir):
    text = tmp_path / "my_text.txt"
    text.write_text("\n\n".join(["some words here and there"] * 40))
    out_file = tmp_path / "eval.json"
    code, _, _ = _run(capsys, "eval", "--model", str(tiny_model_dir), "--ppl", str(text), "--seqlen", "16",
                      "--json", str(out_file), "--no-progress")
    assert code == 0
    assert list(json.loads(out_file.read_text())["perplexity"]) == ["my_text.txt"]


def test_models_lists_bundled(capsys):
    code, out, _ = _run(capsys, "models")
    assert code == 0 and "smollm2-135m" in out and "gemma3-270m" in out and "134,515,008" in out


@requires_smollm2
def test_console_script_end_to_end_on_smollm2(tmp_path):
    """The installed command, in a fresh process, on the real bundled model."""
    out_file = tmp_path / "smol.json"
    command = [sys.executable, "-m", "prunekit.cli", "eval", "--model", "smollm2-135m", "--ppl", "sample",
               "--seqlen", "128", "--max-tokens", "512", "--json", str(out_file), "--no-progress"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    ppl = json.loads(out_file.read_text())["perplexity"]["sample"]
    assert 5 < ppl < 100  # a working 135M model on English prose; a broken conversion gives thousands


def test_save_plan_refuses_a_weight_editing_method_and_reproduces_a_checkpoint(capsys, tmp_path, tiny_model_dir):
    """A SlimGPT plan cannot rebuild its compensated model; a magnitude checkpoint's prunekit.json can."""
    import torch

    import prunekit

    slim = tmp_path / "slim"
    prune = ["prune", "--model", str(tiny_model_dir), "--ratio", "0.3", "--calib-tokens", "1024", "--seqlen", "64",
             "--no-eval", "--no-progress"]
    assert _run(capsys, *prune, "--method", "slimgpt", "--out", str(slim))[0] == 0
    code, _, err = _run(capsys, "save", "--model", str(tiny_model_dir), "--plan", str(slim / "prunekit.json"),
                        "--out", str(tmp_path / "again"))
    assert code == 2 and "edits the kept weights" in err and "--model CHECKPOINT_DIR" in err
    legacy = json.loads((slim / "prunekit.json").read_text())["plan"]
    del legacy["weights_edited"]  # written before the field existed: the method's capability decides
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    code, _, err = _run(capsys, "save", "--model", str(tiny_model_dir), "--plan", str(tmp_path / "legacy.json"),
                        "--out", str(tmp_path / "again"))
    assert code == 2 and "edits the kept weights" in err and not (tmp_path / "again").exists()
    mag = tmp_path / "mag"
    assert _run(capsys, *prune, "--method", "magnitude", "--out", str(mag))[0] == 0
    code, out, err = _run(capsys, "save", "--model", str(tiny_model_dir), "--plan", str(mag / "prunekit.json"),
                          "--out", str(tmp_path / "rebuilt"))
    assert code == 0, err
    ids = torch.tensor([[1, 17, 42, 99, 7]])
    with torch.no_grad():
        original = prunekit.load_pruned(mag, with_tokenizer=False)[0](ids).logits
        rebuilt = prunekit.load_pruned(tmp_path / "rebuilt", with_tokenizer=False)[0](ids).logits
    assert torch.equal(original, rebuilt)
