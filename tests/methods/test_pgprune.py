"""pgprune end to end on tiny models: it learns a known answer, stays forward-only, resumes to the same result,
keeps the budget exactly, and saves its plots beside a checkpoint that reloads exactly."""

import json

import pytest
import torch

import prunekit
from prunekit.errors import PrunekitError
from prunekit.evaluation.memory import PeakMemory
from prunekit.methods import method_info
from prunekit.methods.base import Target
from prunekit.methods.pgprune import policy as policy_module
from prunekit.methods.pgprune.budget import compute_budgets
from prunekit.methods.pgprune.forwards import SampleForwards, row_losses
from prunekit.methods.pgprune.learn import generator_for
from prunekit.methods.wanda_sp import wanda_sp_scores
from prunekit.structure.params import predicted_ratios
from tests.conftest import make_tiny_model, run_cli
from tests.methods import pgprune_helpers as known
from tests.methods.width_helpers import captured_inputs

PGPRUNE = method_info("pgprune")


def _windows(ids):
    from prunekit.data.windows import TokenWindows

    return TokenWindows(ids, "test", "calibration", ids.shape[1], "none", "random", 0, ids.numel())


def _random_windows(count=40, length=24, seed=0):
    return _windows(torch.randint(3, 320, (count, length), generator=torch.Generator().manual_seed(seed)))


def _learned(monkeypatch):
    """Capture the probabilities every final_masks call sees (the last learned ones come before the init's)."""
    seen = []
    original = policy_module.Policy.final_masks

    def spy(self, ties):
        seen.append({kind: values.clone() for kind, values in self.probabilities.items()})
        return original(self, ties)

    monkeypatch.setattr(policy_module.Policy, "final_masks", spy)
    return seen


def _kept_counts(plan):
    return (sum(len(layer.kept_kv_heads) for layer in plan.layers if not layer.layer_removed),
            sum(len(layer.kept_channels) for layer in plan.layers if not layer.layer_removed))


@pytest.fixture(scope="module")
def useless_model():
    model = known.model_with_useless_units()
    return model, known.calibration(model)


def _ablation_costs(model, ids):
    """The loss increase of removing each channel alone (the answer the learner should find)."""
    adapter = prunekit.adapter_for(model)
    full = {"attention": torch.ones(3, 3), "channels": torch.ones(3, 12)}
    costs = torch.zeros(3, 12)
    with SampleForwards(model, adapter, "kv_group", "masked") as forwards:
        base = forwards.loss(ids, full)
        for layer in range(3):
            for channel in range(12):
                mask = {"attention": full["attention"], "channels": full["channels"].clone()}
                mask["channels"][layer, channel] = 0.0
                costs[layer, channel] = forwards.loss(ids, mask) - base
    return costs


def test_learning_separates_exactly_useless_units_from_those_that_matter(useless_model, monkeypatch):
    model, calibration = useless_model
    seen = _learned(monkeypatch)
    result = PGPRUNE.apply_to(model, Target(1 / 3, "linear"), calibration, progress=False, steps=1600,
                              init="uniform", lr_heads=0.05, lr_channels=0.05, eval_every=200)
    learned = seen[-2]
    groups, channels = learned["attention"], learned["channels"]
    useless = known.USELESS_CHANNELS
    # KV groups: the useless one is the least likely in every layer, and exactly those go.
    assert torch.all(groups[:, known.USELESS_GROUP] < groups[:, [0, 1]].min(dim=1).values)
    assert all(layer.kept_kv_heads == [0, 1] for layer in result.plan.layers)
    # Channels: the useless ones are on average far below the rest, far more of them go than chance would remove
    # (4 of 12), and what goes is cheap: the removed channels' mean ablation cost is a small part of the kept
    # ones'. (Useful channels whose removal costs next to nothing rank with the useless ones: within 1600 noisy
    # steps the estimator cannot tell them apart, and an occasional costly one is lost. The trajectory depends on
    # the CPU's floating point: at 800 steps the gap below was 0.14 on an AMD EPYC and passed on an Intel Xeon;
    # at 1600 it is 0.31 on the EPYC.)
    costs = _ablation_costs(model, calibration.input_ids)
    assert channels[:, :useless].mean() < channels[:, useless:].mean() - 0.2, (channels[:, :useless].mean(),
                                                                               channels[:, useless:].mean())
    gone = torch.ones(3, 12, dtype=torch.bool)
    for layer_index, layer in enumerate(result.plan.layers):
        gone[layer_index, layer.kept_channels] = False
    assert int(gone[:, :useless].sum()) >= 7
    assert float(costs[gone].mean()) < 0.25 * float(costs[~gone].mean()), (costs[gone], costs[~gone])
    # Learning improved on its (uniform) init mask, and the budget is exact.
    evaluations = result.artifacts["pgprune-history.json"]["evaluations"]
    assert evaluations[-1]["heldout_loss"] < evaluations[0]["heldout_loss"]
    budgets = compute_budgets(prunekit.adapter_for(model), Target(1 / 3, "linear"), "kv_group")
    assert _kept_counts(result.plan) == (budgets.kept_attention, budgets.kept_channels)


def test_learning_is_forward_only_and_leaves_the_weights_alone(monkeypatch):
    model = make_tiny_model("llama", 4, 2)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    modes = []
    hook = model.register_forward_pre_hook(lambda *_: modes.append(
        (torch.is_inference_mode_enabled(), torch.is_grad_enabled())))
    try:
        for execution in ("masked", "batched", "sliced"):
            PGPRUNE.apply_to(model, Target(0.3), _random_windows(), progress=False, steps=3, execution=execution)
    finally:
        hook.remove()
    assert modes and all(inference and not grad for inference, grad in modes)
    for name, parameter in model.named_parameters():
        assert parameter.grad is None and torch.equal(parameter, before[name]), name


def test_peak_memory_while_learning_is_a_small_factor_of_plain_inference():
    torch.manual_seed(0)
    model = make_tiny_model("llama", 8, 4, layers=2, hidden_size=256, intermediate_size=512, head_dim=32,
                            vocab_size=8192)
    ids = torch.randint(3, 8192, (48, 128), generator=torch.Generator().manual_seed(0))
    batch = ids[:8]
    with PeakMemory("cpu") as inference, torch.inference_mode():
        row_losses(model(batch).logits, batch).mean()
    with PeakMemory("cpu") as learning:
        PGPRUNE.apply_to(model, Target(0.3, "linear"), _windows(ids), progress=False, steps=4, init="uniform",
                         heldout_windows=8, eval_every=2)
    assert inference.bytes and inference.bytes > 8 * 128 * 8192 * 4  # the logits alone: a real measurement
    assert learning.bytes < 3 * inference.bytes, (learning.bytes, inference.bytes)


def _pgprune_run(model, state_path, **options):
    return PGPRUNE.apply_to(model, Target(0.3), _random_windows(), progress=False, steps=8, eval_every=4,
                            save_every=2, state_path=state_path, **options)


def test_a_paused_or_killed_run_resumes_to_the_same_probabilities(tmp_path, monkeypatch):
    model = make_tiny_model("llama", 4, 2)
    seen = _learned(monkeypatch)
    whole = _pgprune_run(model, None)
    reference = seen[-2]
    state = tmp_path / "state.json"
    with pytest.raises(PrunekitError, match="paused after 3 of 8 steps"):
        _pgprune_run(model, state, max_steps=3)
    assert json.loads(state.read_text())["step"] == 3
    # Killed during step 6: the state saved after step 4 is where the rerun starts.
    calls = {"count": 0}
    original = SampleForwards.losses

    def dies_at_step_six(self, input_ids, masks):
        calls["count"] += 1
        if calls["count"] == 3:  # steps 4, 5, then 6 of the rerun that started at 3
            raise KeyboardInterrupt
        return original(self, input_ids, masks)

    monkeypatch.setattr(SampleForwards, "losses", dies_at_step_six)
    with pytest.raises(KeyboardInterrupt):
        _pgprune_run(model, state)
    monkeypatch.setattr(SampleForwards, "losses", original)
    assert json.loads(state.read_text())["step"] == 4
    resumed = _pgprune_run(model, state)
    for kind, values in seen[-2].items():
        assert torch.equal(values, reference[kind]), kind
    assert resumed.plan.to_dict()["layers"] == whole.plan.to_dict()["layers"]
    assert resumed.plan.metrics["pgprune"]["resumed_at"] == [3, 4]


def test_a_state_from_another_run_is_refused(tmp_path):
    model = make_tiny_model("llama", 4, 2)
    state = tmp_path / "state.json"
    with pytest.raises(PrunekitError, match="paused"):
        _pgprune_run(model, state, max_steps=1)
    with pytest.raises(PrunekitError, match="belongs to another run"):
        _pgprune_run(model, state, lr_heads=0.5)


def test_wanda_sp_init_is_the_sigmap_of_the_layer_sequential_wanda_sp_scores(monkeypatch):
    model = make_tiny_model("llama", 4, 2, layers=3)
    adapter = prunekit.adapter_for(model)
    calibration = _random_windows(60)
    seen = _learned(monkeypatch)
    result = PGPRUNE.apply_to(model, Target(0.3), calibration, progress=False, steps=1, init_windows=60)
    initial = seen[-1]  # the last call is the init mask's
    budgets = compute_budgets(adapter, Target(0.3), "kv_group")
    for kind, fraction in (("attention", budgets.attention_fraction), ("channels", budgets.channel_fraction)):
        assert initial[kind].sum() <= fraction * initial[kind].numel() + 1e-4
    # Layer 0 sees the dense model's inputs, so its scores are plain Wanda-sp of the first training windows.
    order = torch.randperm(60, generator=generator_for(0, 3, 0))
    ids = calibration.input_ids[order][16:]
    inputs = captured_inputs(model, adapter, ids)[0]
    heads, channels = wanda_sp_scores(adapter.decoder_layers(model)[0], adapter, inputs["o_proj"].norm(dim=0),
                                      inputs["down_proj"].norm(dim=0))
    groups = heads.view(2, 2).mean(dim=1)
    for probabilities, scores in ((initial["channels"][0], channels), (initial["attention"][0], groups)):
        along_scores = probabilities[scores.argsort()]  # sigmap is monotone: clamping only makes ties
        assert torch.all(along_scores[1:] >= along_scores[:-1])
        assert len(set(along_scores.tolist())) > len(along_scores) // 2  # and most values stay distinct
    init_plan = result.artifacts["pgprune-init-plan.json"]
    assert init_plan["layers"][0]["kept_channels"] == sorted(initial["channels"][0].argsort(descending=True)[
        :len(init_plan["layers"][0]["kept_channels"])].tolist())


@pytest.mark.parametrize("ratio_of", ["all", "linear"])
def test_the_final_plan_keeps_exactly_the_budget_and_meets_the_target(ratio_of):
    model = make_tiny_model("qwen2", 4, 2, layers=4, intermediate_size=192)
    adapter = prunekit.adapter_for(model)
    result = PGPRUNE.apply_to(model, Target(0.25, ratio_of), _random_windows(), progress=False, steps=3)
    budgets = compute_budgets(adapter, Target(0.25, ratio_of), "kv_group")
    assert _kept_counts(result.plan) == (budgets.kept_attention, budgets.kept_channels)
    ratios = predicted_ratios(result.plan, adapter)
    achieved = ratios.ratio_all if ratio_of == "all" else ratios.ratio_layers
    assert achieved == pytest.approx(0.25, abs=0.01)


def test_layer_units_drop_whole_layers_within_the_budget():
    model = make_tiny_model("llama", 4, 2, layers=6)
    adapter = prunekit.adapter_for(model)
    result = PGPRUNE.apply_to(model, Target(0.4, "linear"), _random_windows(), progress=False, steps=4,
                              layer_units=True, layer_share=0.5)
    budgets = compute_budgets(adapter, Target(0.4, "linear"), "kv_group", layer_share=0.5)
    assert sum(layer.layer_removed for layer in result.plan.layers) == 6 - budgets.kept_layers == 1
    assert _kept_counts(result.plan) == (budgets.kept_attention, budgets.kept_channels)
    assert predicted_ratios(result.plan, adapter).ratio_layers == pytest.approx(0.4, abs=0.01)


def _run(capsys, *argv):
    code, _, err = run_cli(capsys, *argv)
    return code, err


FAST = ["--calib", "sample", "--calib-tokens", "1280", "--seqlen", "32", "--no-eval", "--no-progress"]


def test_cli_checkpoint_reloads_exactly_with_history_init_plan_and_plots(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    code, err = _run(capsys, "prune", "--model", tiny_model_dir, "--method", "pgprune", "--ratio", "0.2", "--out",
                     out, *FAST, "--option", "steps=4", "--option", "eval_every=2")
    assert code == 0, err
    manifest = json.loads((out / "prunekit.json").read_text())
    summary = manifest["plan"]["metrics"]["pgprune"]
    assert summary["steps"] == 4 and len(summary["layer_widths"]) == 3
    history = json.loads((out / "pgprune-history.json").read_text())
    assert [entry["step"] for entry in history["evaluations"]] == [0, 2, 4]
    for plot in ("pgprune-learning.png", "pgprune-widths.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "out.pgprune-state.json").exists()  # removed once the checkpoint is saved
    model, _ = prunekit.load_model(out)
    again, _ = prunekit.load_model(out)
    ids = torch.randint(3, 300, (2, 16))
    assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.mark.parametrize("argv,pattern", [
    (["--option", "attention_unit=q_head"], "q_head units are for one-KV-head models"),
    (["--option", "samples=1"], "samples takes an integer >= 2"),
    (["--option", "layer_units=true", "--option", "layer_share=0.1"], "less than one layer"),
    (["--calib-tokens", "320"], "needs at least 24 calibration windows"),
    (["--option", "init=norm"], "init takes one of"),
])
def test_bad_pgprune_input_is_one_line_and_writes_nothing(capsys, tmp_path, tiny_model_dir, argv, pattern):
    out = tmp_path / "out"
    options = FAST + argv if "--calib-tokens" not in argv else [*FAST[:2], *argv, *FAST[4:]]
    code, err = _run(capsys, "prune", "--model", tiny_model_dir, "--method", "pgprune", "--ratio", "0.2", "--out",
                     out, *options)
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert code == 2 and len(lines) == 1 and pattern in lines[0], err
    assert not out.exists()


def test_a_per_layer_budget_scope_keeps_every_layer_within_its_own_budget(monkeypatch):
    model = make_tiny_model("llama", 4, 2, layers=3)
    seen = _learned(monkeypatch)
    PGPRUNE.apply_to(model, Target(0.3, "linear"), _random_windows(), progress=False, steps=4, lr_channels=0.5,
                     budget_scope="layer")
    budgets = compute_budgets(prunekit.adapter_for(model), Target(0.3, "linear"), "kv_group")
    channels = seen[-2]["channels"]
    assert torch.all(channels.sum(dim=1) <= budgets.channel_fraction * channels.shape[1] + 1e-4)


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3", "mistral"])
def test_other_families_learn_and_keep_the_budget(family):
    kv_heads = 1 if family == "gemma3_text" else 2
    model = make_tiny_model(family, 4, kv_heads, layers=3)
    adapter = prunekit.adapter_for(model)
    result = PGPRUNE.apply_to(model, Target(0.3, "linear"), _random_windows(), progress=False, steps=3)
    unit = "q_head" if kv_heads == 1 else "kv_group"
    budgets = compute_budgets(adapter, Target(0.3, "linear"), unit)
    kept_attention = sum(len(layer.kept_heads if unit == "q_head" else layer.kept_kv_heads)
                         for layer in result.plan.layers)
    assert kept_attention == budgets.kept_attention
    assert all(len(layer.kept_kv_heads) == kv_heads or unit == "kv_group" for layer in result.plan.layers)
    assert predicted_ratios(result.plan, adapter).ratio_layers == pytest.approx(0.3, abs=0.01)
