import pytest
import torch
import torch.nn.functional as F

from prunekit.errors import PrunekitError
from prunekit.methods import prune
from prunekit.methods.base import Target
from prunekit.models.adapters import adapter_for
from tests.methods.depth_helpers import peaked_model, run_method, sampled_windows, schedule_of


def _direct_block_influence(model, windows):
    """BI per layer from hooks on a plain forward: 1 - mean over tokens of cos(layer input, layer output)."""
    pairs = []

    def hook(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        pairs.append((hidden, output[0] if isinstance(output, tuple) else output))

    layers = adapter_for(model).decoder_layers(model)
    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    with torch.no_grad():
        model(input_ids=windows.input_ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return [float((1 - F.cosine_similarity(x.float(), y.float(), dim=-1)).double().mean()) for x, y in pairs]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_shortgpt_removes_the_layers_with_the_lowest_block_influence(family):
    model = peaked_model(family, layers=6)
    windows = sampled_windows(model, count=4)
    expected = _direct_block_influence(model, windows)
    plan, artifacts = run_method("shortgpt", model, windows, blocks=3)
    scores = artifacts["shortgpt_scores.json"]["scores"]
    assert scores == pytest.approx(expected, rel=1e-5, abs=1e-7)
    lowest = sorted(range(6), key=lambda layer: (expected[layer], layer))[:3]
    assert [index for index, layer in enumerate(plan.layers) if layer.layer_removed] == sorted(lowest)
    assert not any(layer.attn_removed != layer.layer_removed for layer in plan.layers)


def test_shortgpt_ratio_target_and_angular_metric(tiny_tokenizer):
    model = peaked_model("llama", layers=6)
    windows = sampled_windows(model, count=4)
    result = prune(model, tiny_tokenizer, "shortgpt", 0.2, calibration=windows, progress=False)
    removed = result.artifacts["shortgpt_scores.json"]["removed"]
    ratio = result.metrics["parameters"]["ratio_all"]
    assert model.config.num_hidden_layers == 6 - len(removed)
    assert ratio >= 0.2 > ratio * (len(removed) - 1) / len(removed)  # the smallest count reaching the target
    _, artifacts = run_method("shortgpt", peaked_model("llama", layers=6), windows, blocks=2, metric="angular")
    assert all(0 <= score <= 1 for score in artifacts["shortgpt_scores.json"]["scores"])
    with pytest.raises(PrunekitError, match="more than the 5 layers"):
        run_method("shortgpt", peaked_model("llama", layers=6), windows, blocks=6)


def test_sleb_never_removes_the_first_or_last_alive_layer():
    model = peaked_model("llama", layers=6)
    windows = sampled_windows(model, count=4)
    schedule = schedule_of("sleb", model, windows, blocks=4)
    alive = list(range(6))
    for (kind, layer), candidates in zip(schedule["order"], schedule["candidate_ppl"], strict=True):
        assert kind == "layer" and layer not in (alive[0], alive[-1])
        assert {entry[1] for entry in candidates} == set(alive[1:-1])
        alive.remove(layer)
    assert alive[0] == 0 and alive[-1] == 5
    with pytest.raises(PrunekitError, match="more than the 4 layers"):
        run_method("sleb", model, windows, blocks=5)
    wider = schedule_of("sleb", model, windows, blocks=2, keep_first=2, keep_last=2)
    assert all(layer in (2, 3) for _, layer in wider["order"])


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_sleb_fast_search_equals_plain_search(family):
    model = peaked_model(family, layers=5)
    windows = sampled_windows(model)
    fast = schedule_of("sleb", model, windows, blocks=3)
    plain = schedule_of("sleb", model, windows, blocks=3, search="plain")
    assert fast["order"] == plain["order"]
    assert fast["calibration_nll_sum"] == plain["calibration_nll_sum"]
    assert sum(fast["branch_executions"]) < sum(plain["branch_executions"])


def test_sleb_ratio_target_materialises_whole_layers(tiny_tokenizer):
    model = peaked_model("llama", layers=5)
    windows = sampled_windows(model, count=4)
    result = prune(model, tiny_tokenizer, "sleb", 0.25, calibration=windows, progress=False)
    schedule = result.artifacts["sleb_schedule.json"]
    assert result.metrics["parameters"]["ratio_all"] >= 0.25
    assert model.config.num_hidden_layers == 5 - schedule["selected_blocks"]
    assert schedule["ratio_all"][schedule["selected_blocks"] - 1] < 0.25 <= schedule["ratio_all"][-1]
    with pytest.raises(PrunekitError, match="out of reach"):
        run_method("sleb", peaked_model("llama", layers=5), windows, Target(0.9))


def test_prune_takes_a_block_count_for_the_depth_methods(tiny_tokenizer):
    model = peaked_model("llama", layers=4)
    windows = sampled_windows(model, count=4)
    result = prune(model, tiny_tokenizer, "sleb", blocks=2, calibration=windows, progress=False)
    assert result.metrics["target"] == {"blocks": 2}
    assert result.plan.settings["keep_first"] == 1 and "blocks" not in result.plan.settings  # the config's options
    assert sum(layer.layer_removed for layer in result.plan.layers) == 2


@pytest.mark.parametrize(
    "method,kwargs,pattern",
    [
        ("sleb", {"ratio": 0.2, "blocks": 2}, "either --ratio or --blocks, not both"),
        ("sleb", {}, "required: --ratio or --blocks"),
        ("magnitude", {"blocks": 2}, "applies to the depth methods"),
        ("sleb", {"blocks": 0}, "positive whole number"),
    ],
)
def test_prune_rejects_a_bad_target(tiny_tokenizer, method, kwargs, pattern):
    model = peaked_model("llama", layers=3)
    with pytest.raises(PrunekitError, match=pattern):
        prune(model, tiny_tokenizer, method, calibration=sampled_windows(model, count=2), progress=False, **kwargs)
