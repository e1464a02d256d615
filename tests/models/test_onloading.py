"""Layer-by-layer onloading: a model read from its shards one layer at a time gives the in-memory result exactly
(plan, weights, perplexity), reads what it says it reads, and fails cleanly on bad input."""

from __future__ import annotations

import json

import pytest
import torch

import prunekit
from prunekit.data.windows import TokenWindows
from prunekit.errors import PrunekitError
from prunekit.evaluation.perplexity import perplexity
from prunekit.methods.run import prune, prune_onloaded
from prunekit.models.fit import choose_offload, footprint
from prunekit.models.onloading import open_onloaded
from prunekit.models.shards import ShardedCheckpoint
from tests.conftest import error_lines, make_tiny_model, model_directory, run_cli


def _windows(vocab: int, seed: int, count: int = 8, seqlen: int = 32) -> TokenWindows:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (count, seqlen), generator=generator)
    return TokenWindows(ids, "random", "all", seqlen, "none", "random", seed, ids.numel())


def _sharded(tmp_path, family="llama", **overrides):
    model = make_tiny_model(family, 4, 2, layers=3, **overrides)
    model.save_pretrained(tmp_path / "dense", max_shard_size="40KB")
    return model, tmp_path / "dense"


@pytest.mark.parametrize("method, options", [
    ("slimgpt", {}),
    ("slimgpt", {"inverse_update": "downdate"}),
    ("wanda-sp", {}),
    ("wanda-sp", {"sequential": True}),
    ("llmbip", {"allocation": "global"}),
    ("flap", {}),
    ("shortgpt", {}),
])
@pytest.mark.parametrize("tied", [False, True])
def test_onloaded_pruning_equals_in_memory_pruning(tmp_path, method, options, tied):
    model, directory = _sharded(tmp_path, tie_word_embeddings=tied)
    calibration, evaluation = _windows(model.config.vocab_size, 1), _windows(model.config.vocab_size, 2, count=4)
    result = prune(model, None, method, 0.3, calibration=calibration, evaluation=evaluation, progress=False,
                   **options)
    metrics = prune_onloaded(directory, method, tmp_path / "onloaded", 0.3, calibration=calibration,
                             evaluation=evaluation, progress=False, **options)
    for key in ("perplexity_before", "perplexity_after"):
        assert metrics[key]["perplexity"] == result.metrics[key]["perplexity"]
    assert metrics["parameters"] == result.metrics["parameters"]
    loaded, _ = prunekit.load_pruned(tmp_path / "onloaded", with_tokenizer=False)
    assert loaded.prunekit_plan.to_dict()["layers"] == result.plan.to_dict()["layers"]
    expected, actual = result.model.state_dict(), loaded.state_dict()
    assert sorted(expected) == sorted(actual)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert len(list((tmp_path / "onloaded").glob("model-*-of-*.safetensors"))) == len(loaded.model.layers) + 2
    assert not list(tmp_path.glob(".prunekit-edits-*")) and not list(tmp_path.glob(".tmp-*"))


def test_each_layer_is_read_once_by_the_method_and_once_by_the_writer(tmp_path):
    model, directory = _sharded(tmp_path, tie_word_embeddings=False)
    metrics = prune_onloaded(directory, "slimgpt", tmp_path / "out", 0.3,
                             calibration=_windows(model.config.vocab_size, 1), progress=False)
    reads = metrics["source_reads"]
    stored = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    layer_bytes = sum(tensor.numel() * tensor.element_size() for name, tensor in model.state_dict().items()
                      if ".layers." in name)
    embedding = model.model.embed_tokens.weight
    # layers: the method's walk and the writer; embedding: the capture and the writer; norm and head: the writer
    assert reads["bytes_read"] == stored + layer_bytes + embedding.numel() * embedding.element_size()
    assert reads["fewest_reads"] == 1 and reads["most_reads"] == 2


def test_onloaded_perplexity_of_a_pruned_checkpoint_equals_the_loaded_model(tmp_path):
    model, _ = _sharded(tmp_path)
    result = prune(model, None, "wanda-sp", 0.3, calibration=_windows(model.config.vocab_size, 1), progress=False)
    result.save(tmp_path / "pruned")
    evaluation = _windows(model.config.vocab_size, 2, count=4)
    onloaded, _, _ = open_onloaded(tmp_path / "pruned")
    assert all(parameter.is_meta for parameter in onloaded.parameters())
    assert perplexity(onloaded, evaluation, progress=False).perplexity == pytest.approx(
        perplexity(result.model, evaluation, progress=False).perplexity, rel=1e-6)


def test_a_shard_truncated_mid_run_is_one_line_and_leaves_nothing(tmp_path):
    model, directory = _sharded(tmp_path)
    index = prunekit.models.shards.ShardedCheckpoint(directory)
    last_layer = index.files["model.layers.2.mlp.down_proj.weight"]
    path = directory / last_layer
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PrunekitError, match=rf"shard .*{last_layer} cannot be (opened|read).*truncated") as error:
        prune_onloaded(directory, "slimgpt", tmp_path / "out", 0.3,
                       calibration=_windows(model.config.vocab_size, 1), progress=False)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".prunekit-edits-*")) and not list(tmp_path.glob(".tmp-*"))


def test_methods_and_models_that_cannot_be_onloaded_are_refused(tmp_path):
    model, directory = _sharded(tmp_path)
    calibration = _windows(model.config.vocab_size, 1)
    for method in ("magnitude", "taylor"):
        with pytest.raises(PrunekitError, match=f"'{method}' cannot run on an onloaded model yet.*blockpruner"):
            prune_onloaded(directory, method, tmp_path / "out", 0.2, calibration=calibration)
    gemma = make_tiny_model("gemma3_text", 4, 1, layers=2)
    gemma.save_pretrained(tmp_path / "gemma")
    with pytest.raises(PrunekitError, match="gemma3_text keeps computed buffers.*--offload none"):
        open_onloaded(tmp_path / "gemma")
    prune(model, None, "wanda-sp", 0.3, calibration=calibration, progress=False).save(tmp_path / "pruned")
    with pytest.raises(PrunekitError, match="is already pruned"):
        prune_onloaded(tmp_path / "pruned", "slimgpt", tmp_path / "out", 0.3, calibration=calibration)
    assert not (tmp_path / "out").exists()


def test_auto_offload_loads_whole_what_fits_and_onloads_the_rest(tmp_path):
    model, directory = _sharded(tmp_path)
    sizes = footprint(directory, torch.float32)
    assert sizes.total == sum(t.numel() * 4 for t in model.state_dict().values())
    assert sizes.largest_layer == sum(t.numel() * 4 for n, t in model.state_dict().items() if ".layers.0." in n)
    cpu = torch.device("cpu")
    assert choose_offload(directory, torch.float32, cpu, available=4 * sizes.total)[0] == "none"
    mode, reason = choose_offload(directory, torch.float32, cpu, available=2 * sizes.onloaded)
    assert mode == "disk" and "more than half" in reason
    assert choose_offload(directory, torch.float32, cpu, "none", available=sizes.onloaded)[0] == "none"
    with pytest.raises(PrunekitError, match=r"cannot fit even layer by layer: .* need [\d.]+ MiB in float32"):
        choose_offload(directory, torch.float32, cpu, "disk", available=sizes.onloaded)
    assert choose_offload(None, torch.float32, cpu)[0] == "none"
    (tmp_path / "no-weights").mkdir()
    assert choose_offload(tmp_path / "no-weights", torch.float32, cpu)[0] == "none"  # the loader names the problem
    with pytest.raises(PrunekitError, match="has no model.safetensors"):
        choose_offload(tmp_path / "no-weights", torch.float32, cpu, "disk")
    with pytest.raises(PrunekitError, match="--offload disk reads a local model directory"):
        choose_offload(None, torch.float32, cpu, "disk")


def test_cli_prune_and_eval_with_offload_disk(capsys, tmp_path, tiny_tokenizer):
    directory = model_directory(make_tiny_model("llama"), tiny_tokenizer, tmp_path / "dense")
    common = ["--calib", "sample", "--eval", "sample", "--calib-tokens", "512", "--seqlen", "64",
              "--eval-tokens", "512", "--no-progress"]
    code, out, err = run_cli(capsys, "prune", "--model", directory, "--method", "slimgpt", "--ratio", "0.2",
                             "--out", tmp_path / "disk", "--offload", "disk", "--save-dtype", "bfloat16", *common)
    assert code == 0, err
    code, out_memory, err = run_cli(capsys, "prune", "--model", directory, "--method", "slimgpt", "--ratio", "0.2",
                                    "--out", tmp_path / "memory", "--save-dtype", "bfloat16", *common)
    assert code == 0 and "--offload auto" not in err  # loading whole is not announced
    def table(text):  # the before/after rows without the prune time
        return [line.rsplit(None, 1)[0] for line in text.splitlines() if line.startswith(("dense", "slimgpt"))]

    assert table(out) == table(out_memory) and len(table(out)) == 2
    disk, _ = prunekit.load_pruned(tmp_path / "disk", dtype=torch.bfloat16, with_tokenizer=False)
    memory, _ = prunekit.load_pruned(tmp_path / "memory", dtype=torch.bfloat16, with_tokenizer=False)
    assert all(torch.equal(a, b) for a, b in zip(disk.state_dict().values(), memory.state_dict().values(),
                                                strict=True))
    reports = []
    for offload in ("disk", "none"):
        code, out, err = run_cli(capsys, "eval", "--model", tmp_path / "disk", "--ppl", "sample", "--seqlen", "64",
                                 "--max-tokens", "512", "--offload", offload, "--no-progress")
        assert code == 0, err
        reports.append(out.splitlines()[2].split()[:2])
    assert reports[0] == reports[1]
    dense_reports = []
    for offload in ("cpu", "disk", "none"):
        code, out, err = run_cli(capsys, "eval", "--model", directory, "--ppl", "sample", "--seqlen", "64",
                                 "--max-tokens", "512", "--offload", offload, "--no-progress")
        assert code == 0, err
        dense_reports.append(out.splitlines()[2].split()[:2])
    assert dense_reports[0] == dense_reports[1] == dense_reports[2]
    code, out, err = run_cli(capsys, "prune", "--model", directory, "--method", "slimgpt", "--ratio", "0.2",
                             "--out", tmp_path / "cpu", "--offload", "cpu", "--save-dtype", "bfloat16", *common)
    assert code == 0 and table(out) == table(out_memory), err
    code, _, err = run_cli(capsys, "eval", "--model", tmp_path / "disk", "--tasks", "prunekit_lastword",
                           "--offload", "disk", "--no-progress")
    assert code == 2 and error_lines(err) == [
        "prunekit: error: --tasks runs lm-eval on a model in memory; it cannot run with --offload disk"]


@pytest.mark.parametrize("method, blocks", [("blockpruner", 3), ("sleb", 1)])
def test_onloaded_depth_search_reads_each_layer_once_per_step(tmp_path, monkeypatch, method, blocks):
    from tests.methods.depth_helpers import peaked_model, sampled_windows

    model = peaked_model("llama", layers=3)
    model.save_pretrained(tmp_path / "dense", max_shard_size="40KB")
    windows = sampled_windows(model)
    result = prune(model, None, method, blocks=blocks, calibration=windows, progress=False)
    checkpoints = []
    original_init = ShardedCheckpoint.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        checkpoints.append(self)

    monkeypatch.setattr(ShardedCheckpoint, "__init__", recording_init)
    prune_onloaded(tmp_path / "dense", method, tmp_path / "out", blocks=blocks, calibration=windows, progress=False)
    name = f"{method}_schedule.json"
    expected, onloaded = result.artifacts[name], json.loads((tmp_path / "out" / name).read_text())
    assert onloaded["order"] == expected["order"] and onloaded["search"] == "layer_major"
    assert onloaded["calibration_nll_sum"] == expected["calibration_nll_sum"]  # bit-identical
    reads, steps = checkpoints[0].reads, len(onloaded["order"])
    for index in range(3):
        removed_at = [step for step, unit in enumerate(onloaded["order"], 1) if unit == ["layer", index]]
        mlp_gone = [step for step, unit in enumerate(onloaded["order"], 1) if unit == ["mlp", index]]
        attention_gone = [step for step, unit in enumerate(onloaded["order"], 1) if unit == ["attn", index]]
        # a layer still runs in a step unless both its blocks were removed in earlier steps
        gone = removed_at or ([max(mlp_gone[0], attention_gone[0])] if mlp_gone and attention_gone else [])
        running_steps = steps if not gone else gone[0]
        written = not removed_at
        # the dense pass, one read in every step where it still runs, and the writer if the layer survives
        assert reads[f"model.layers.{index}.mlp.up_proj.weight"] == 1 + running_steps + written


def test_onloaded_pgprune_learns_what_the_in_memory_run_learns(tmp_path):
    model, directory = _sharded(tmp_path)
    calibration = _windows(model.config.vocab_size, 1, count=32)
    options = {"steps": 4, "samples": 2, "eval_every": 2, "execution": "masked"}
    result = prune(model, None, "pgprune", 0.2, calibration=calibration, progress=False, **options)
    prune_onloaded(directory, "pgprune", tmp_path / "out", 0.2, calibration=calibration, progress=False, **options)
    manifest = json.loads((tmp_path / "out" / "prunekit.json").read_text())
    assert manifest["plan"]["layers"] == result.plan.to_dict()["layers"]
    learned = manifest["plan"]["metrics"]["pgprune"]
    assert learned["heldout_loss_final_mask"] == result.plan.metrics["pgprune"]["heldout_loss_final_mask"]
    with pytest.raises(PrunekitError, match="execution=sliced needs the whole model in memory"):
        prune_onloaded(directory, "pgprune", tmp_path / "sliced", 0.2, calibration=calibration, progress=False,
                       **{**options, "execution": "sliced"})


@pytest.mark.parametrize("method", ["slimgpt", "flap", "blockpruner"])
def test_offload_cpu_moves_one_module_at_a_time_and_gives_the_in_memory_result(tmp_path, method):
    import copy

    model = make_tiny_model("llama", 4, 2, layers=3)
    source = copy.deepcopy(model)
    calibration = _windows(model.config.vocab_size, 1)
    target = {"blocks": 2} if method == "blockpruner" else {"ratio": 0.3}
    result = prune(model, None, method, calibration=calibration, progress=False, **target)
    metrics = prune_onloaded(source, method, tmp_path / "out", calibration=calibration, progress=False, **target)
    assert metrics["offload"] == "cpu" and metrics["source_reads"]["most_reads"] >= 2
    loaded, _ = prunekit.load_pruned(tmp_path / "out", with_tokenizer=False)
    assert loaded.prunekit_plan.to_dict()["layers"] == result.plan.to_dict()["layers"]
    expected, actual = result.model.state_dict(), loaded.state_dict()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    untouched = make_tiny_model("llama", 4, 2, layers=3).state_dict()
    assert all(torch.equal(untouched[name], tensor) for name, tensor in source.state_dict().items())
