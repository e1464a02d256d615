"""``prunekit compare`` on a tiny model: every cell, fresh dense weights per cell, shared nested searches, a failing
cell recorded while the others run, resume after a kill, and a rerun that computes nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import prunekit
from prunekit.data.windows import calibration_windows, evaluation_windows
from prunekit.evaluation import compare
from prunekit.evaluation.compare import CompareSettings, read_cells, run_compare
from prunekit.evaluation.perplexity import perplexity
from prunekit.report.browser import dump_dom, find_chromium, screenshot
from prunekit.report.compare import write_report
from tests.conftest import make_tiny_model, model_directory


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    return model_directory(make_tiny_model("llama", layers=4, seed=5), tiny_tokenizer,
                           tmp_path_factory.mktemp("model") / "tiny")


def settings_for(model_dir, **overrides) -> CompareSettings:
    values = dict(model=str(model_dir), calib_tokens=512, seqlen=64, eval_tokens=256, eval_seqlen=64,
                  eval_corpora=("mix",), tasks=("prunekit_continuation",), task_limit=4, task_batch_size=4,
                  speed_shapes=((1, 16),), decode_tokens=3, speed_repeats=1)
    values.update(overrides)
    return CompareSettings(**values)


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory):
    """flap (edits weights), sleb (nested, resumable) and magnitude at 0.2 and 0.3; magnitude at 0.9 cannot be
    reached (a failing cell)."""
    out = tmp_path_factory.mktemp("run") / "cmp"
    settings = settings_for(tiny_dir)
    computed = run_compare(out, settings, ["flap", "sleb", "magnitude"], [0.2, 0.3, 0.9], progress=False,
                           log=lambda line: None)
    return out, settings, computed


def _cell(out, name):
    return json.loads((out / "cells" / f"{name}.json").read_text())


def test_every_cell_recorded_and_a_failure_does_not_stop_the_others(finished):
    out, _, computed = finished
    assert computed[0] == "dense" and len(computed) == 10
    failed = _cell(out, "magnitude@0.9")
    assert failed["status"] == "failed" and "lower --ratio" in failed["error"] and "\n" not in failed["error"]
    assert "Traceback" in (out / "logs" / "magnitude@0.9.txt").read_text()
    _, cells = read_cells(out)
    by_name = {f"{c['method']}@{c['ratio']:g}": c for c in cells}
    for name in ("flap@0.2", "flap@0.3", "sleb@0.2", "sleb@0.3", "magnitude@0.2", "magnitude@0.3"):
        cell = by_name[name]
        assert cell["status"] == "ok", cell.get("error")
        assert set(cell["perplexity"]) == {"mix"} and cell["zero_shot"]["tasks"]["prunekit_continuation"]["items"] == 4
        assert cell["speedup"]["decode"] > 0 and cell["prune_seconds"] >= 0
        assert cell["parameters"]["pruned_parameters"] < cell["parameters"]["dense_parameters"]


def test_weight_editing_cells_start_from_fresh_dense_weights(finished, tiny_dir):
    """flap@0.3 ran after flap@0.2 edited its copy; it must equal flap at 0.3 on a freshly loaded model."""
    out, settings, _ = finished
    model, tokenizer = prunekit.load_model(tiny_dir)
    calibration = calibration_windows(tokenizer, "mix", settings.calib_tokens, settings.seqlen, "random",
                                      settings.seed, settings.bos)
    evaluation = evaluation_windows(tokenizer, "mix", settings.eval_seqlen, settings.eval_tokens, settings.bos)
    result = prunekit.prune(model, tokenizer, "flap", 0.3, calibration=calibration, progress=False)
    alone = perplexity(result.model, evaluation, progress=False).perplexity
    assert _cell(out, "flap@0.3")["perplexity"]["mix"] == pytest.approx(alone, rel=1e-6)


def test_nested_search_runs_once_and_smaller_ratios_take_its_prefix(finished):
    out, _, _ = finished
    larger, smaller = _cell(out, "sleb@0.3"), _cell(out, "sleb@0.2")
    assert not larger["search_shared"] and smaller["search_shared"]
    state = json.loads((out / "states" / "sleb.json").read_text())
    schedule = [step["unit"][1] for step in state["steps"]]
    assert set(smaller["removed_layers"]) <= set(larger["removed_layers"]) == set(schedule)
    assert smaller["removed_layers"] == sorted(schedule[:len(smaller["removed_layers"])])


def test_rerun_computes_nothing_and_other_settings_are_refused(finished):
    out, settings, _ = finished
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert run_compare(out, settings, ["flap", "sleb", "magnitude"], [0.2, 0.3, 0.9], progress=False,
                       log=lambda line: None) == []
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    (out / "cells" / "dense.json").unlink()  # the way to measure the reference again
    assert run_compare(out, settings, ["flap", "sleb", "magnitude"], [0.2, 0.3, 0.9], progress=False,
                       log=lambda line: None) == ["dense"]
    _, cells = read_cells(out)
    dense, flap = cells[0], next(c for c in cells if c["method"] == "flap")
    assert flap["speedup"]["decode"] == (flap["speed"]["decode_tokens_per_second"]
                                         / dense["speed"]["decode_tokens_per_second"])
    with pytest.raises(prunekit.PrunekitError, match="other settings \\(seed differ"):
        run_compare(out, settings_for(settings.model, seed=1), ["flap"], [0.2], progress=False)


def test_killed_run_loses_only_the_cell_in_progress(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    settings = settings_for(tiny_dir, tasks=())
    real_measure, calls = compare.measure, []

    def killed_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # dense, magnitude@0.2, then killed inside magnitude@0.3
            raise KeyboardInterrupt
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(compare, "measure", killed_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_compare(out, settings, ["magnitude"], [0.2, 0.3], progress=False, log=lambda line: None)
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["dense.json", "magnitude@0.2.json"]
    monkeypatch.setattr(compare, "measure", real_measure)
    assert run_compare(out, settings, ["magnitude"], [0.2, 0.3], progress=False,
                       log=lambda line: None) == ["magnitude@0.3"]


def test_report_files_from_the_cells(finished):
    out, _, _ = finished
    paths = write_report(out, "prunekit compare ...")
    settings, cells = read_cells(out)
    assert json.loads(paths["json"].read_text())["cells"] == cells
    rows = paths["csv"].read_text().splitlines()
    assert len(rows) == 1 + len(cells) and rows[0].startswith("method,target_ratio,status")
    table = paths["md"].read_text()
    assert "| flap | 30% |" in table and "failed: " in table
    names = sorted(p.name for p in (out / "plots").iterdir())
    assert names == ["accuracy.png", "kept_0.2.png", "kept_0.3.png", "perplexity.png", "speedup.png"]
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 5 and "<table>" in page and "magnitude @ 0.9" in page
    assert "http" not in page.replace("http-equiv", "")  # nothing loaded from elsewhere


def test_bad_requests_are_one_line_errors(tiny_dir, tmp_path):
    settings = settings_for(tiny_dir)
    for methods, ratios, options, match in [
        (["nope"], [0.2], {}, "unknown method 'nope'"),
        (["magnitude"], [1.5], {}, "--ratio 1.5 is out of range"),
        (["magnitude"], [0.2], {"sleb": {"x": "1"}}, "--option for 'sleb', which is not in --methods"),
        (["magnitude"], [0.2], {"magnitude": {"nonsense": "1"}}, "nonsense"),
    ]:
        with pytest.raises(prunekit.PrunekitError, match=match):
            run_compare(tmp_path / "x", settings_for(tiny_dir, options=options), methods, ratios, progress=False)
    assert not (tmp_path / "x").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("mine")
    with pytest.raises(prunekit.PrunekitError, match="is not a compare run"):
        run_compare(tmp_path / "other", settings, ["magnitude"], [0.2], progress=False)


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (make test installs it)")
def test_report_renders_in_headless_chromium_with_every_plot(finished, tmp_path):
    out, _, _ = finished
    page = write_report(out)["html"]
    body = re.search(r"<body[^>]*>", dump_dom(page)).group(0)
    assert 'data-images="5"' in body and 'data-images-decoded="5"' in body  # every embedded PNG decoded
    shot = screenshot(page, tmp_path / "shot.png", 1000, 1400)
    from PIL import Image

    pixels = Image.open(shot).convert("L").getextrema()
    assert pixels[0] < 100 < 200 < pixels[1]  # text and plots on a light page, not a blank image


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunekit.cli", "compare", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("extra, message", [
    (["--ratios", "0.2,x"], "--ratios: 'x' is not a number"),
    (["--option", "steps=3"], "--option 'steps=3' is not METHOD.KEY=VALUE"),
    (["--tasks", "no_such_task"], "unknown zero-shot task 'no_such_task'"),
    (["--decode-tokens", "1"], "--decode-tokens must be 0 (skip) or at least 2"),
])
def test_compare_cli_bad_input_is_one_line(tiny_dir, tmp_path, extra, message):
    done = _cli("--model", str(tiny_dir), "--methods", "magnitude", "--out", str(tmp_path / "cmp"), *extra)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "cmp").exists()


def test_a_model_that_does_not_load_leaves_no_run_directory(tmp_path):
    with pytest.raises(prunekit.PrunekitError):
        run_compare(tmp_path / "cmp", settings_for(tmp_path / "no-model"), ["magnitude"], [0.2], progress=False)
    assert not (tmp_path / "cmp").exists()


def test_compare_cli_writes_the_report_with_the_command(tiny_dir, tmp_path, capsys):
    from prunekit.cli import main

    argv = ["compare", "--model", str(tiny_dir), "--methods", "magnitude", "--ratios", "0.2", "--out",
            str(tmp_path / "cmp"), "--calib-tokens", "256", "--seqlen", "64", "--eval-tokens", "128",
            "--eval-seqlen", "64", "--tasks", "none", "--shapes", "1x16", "--decode-tokens", "3", "--repeats", "1",
            "--no-progress"]
    assert main(argv) == 0
    assert "| magnitude | 20% |" in capsys.readouterr().out
    report = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert report["command"] == "prunekit " + " ".join(argv) and report["settings"]["tasks"] == []
    assert "zero_shot" not in report["cells"][1]
