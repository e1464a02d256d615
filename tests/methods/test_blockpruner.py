import copy
import json
import math

import pytest
import torch

import prunekit
from prunekit.errors import PrunekitError
from prunekit.evaluation.perplexity import perplexity
from prunekit.methods.base import Target
from prunekit.methods.depth import ATTN, MLP, Unit, plan_from_units, removal_ratios
from prunekit.methods.depth.report import step_line
from prunekit.methods.depth.stack import BranchStack
from prunekit.methods.depth.step import run_step
from prunekit.models.adapters import adapter_for
from prunekit.structure.params import measured_ratios, predicted_ratios
from tests.conftest import FAMILIES
from tests.methods.depth_helpers import peaked_model, run_method, sampled_windows, schedule_of


def _complete_scores(schedule):
    """Per step, {unit: ppl} of the completely scored candidates."""
    return [{(kind, layer): ppl for kind, layer, ppl, _ in step if ppl is not None}
            for step in schedule["candidate_ppl"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_search_equals_plain_search(family):
    """Prefix cache + early abandon, and the layer-major walk, change neither the schedule nor any completed
    score, in any family."""
    model = peaked_model(family)
    windows = sampled_windows(model)
    runs = {mode: schedule_of("blockpruner", model, windows, blocks=4, search=mode)
            for mode in ("fast", "prefix", "plain", "layer_major")}
    plain = runs["plain"]
    for mode in ("fast", "prefix", "layer_major"):
        assert runs[mode]["order"] == plain["order"]
        assert runs[mode]["calibration_nll_sum"] == plain["calibration_nll_sum"]  # bit-identical
    assert runs["prefix"]["candidate_ppl"] == plain["candidate_ppl"]
    for mode in ("fast", "layer_major"):  # early abandon and the screened head: completed scores are exact
        for step, plain_step in zip(_complete_scores(runs[mode]), _complete_scores(plain), strict=True):
            assert step.items() <= plain_step.items()
    assert sum(runs["prefix"]["branch_executions"]) < sum(plain["branch_executions"])
    # layer-major runs every candidate through every layer, but abandons at the head
    assert sum(runs["layer_major"]["head_executions"]) < sum(runs["prefix"]["head_executions"])


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_recorded_scores_equal_a_fresh_evaluation_of_the_materialised_model(family):
    model = peaked_model(family, layers=3)
    windows = sampled_windows(model)
    dense = copy.deepcopy(model)
    schedule = schedule_of("blockpruner", model, windows, blocks=5)
    adapter = adapter_for(dense)
    units = [Unit(kind, layer) for kind, layer in schedule["order"]]
    for k in range(len(units) + 1):
        pruned = prunekit.apply_plan(copy.deepcopy(dense), plan_from_units(adapter, units[:k]))
        fresh = perplexity(pruned, windows, progress=False).perplexity
        assert schedule["calibration_ppl"][k] == pytest.approx(fresh, rel=1e-5)
        assert schedule["ratio_all"][k] == pytest.approx(measured_ratios(pruned, adapter).ratio_all)
    for a, b in zip(model.state_dict().values(), dense.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the search leaves the model untouched


def test_early_abandon_reduces_branch_runs_and_keeps_margins_exact():
    model = peaked_model("llama", layers=4)
    windows = sampled_windows(model, count=12)
    exact = schedule_of("blockpruner", model, windows, blocks=4, abandon_bound="runner_up", screen_topk=0)
    loose = schedule_of("blockpruner", model, windows, blocks=4, screen_topk=0)  # default bound: the best's
    prefix = schedule_of("blockpruner", model, windows, blocks=4, search="prefix")
    assert exact["order"] == loose["order"] == prefix["order"]
    assert sum(exact["abandoned"]) > 0
    assert sum(loose["branch_executions"]) <= sum(exact["branch_executions"]) < sum(prefix["branch_executions"])
    assert sum(exact["head_executions"]) < sum(prefix["head_executions"])
    assert all(exact["margin_exact"]) and exact["margins"] == pytest.approx(prefix["margins"], rel=1e-12)
    for margin, is_exact, true in zip(loose["margins"], loose["margin_exact"], prefix["margins"], strict=True):
        assert margin == pytest.approx(true, rel=1e-12) if is_exact else margin <= true  # else: a lower bound


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_screened_head_keeps_the_schedule_and_saves_head_runs(family):
    model = peaked_model(family, layers=4)
    windows = sampled_windows(model, count=12)
    unscreened = schedule_of("blockpruner", model, windows, blocks=4, screen_topk=0)
    screened = schedule_of("blockpruner", model, windows, blocks=4, screen_topk=8)
    plain = schedule_of("blockpruner", model, windows, blocks=4, search="plain")
    assert screened["order"] == unscreened["order"] == plain["order"]
    assert screened["calibration_nll_sum"] == plain["calibration_nll_sum"]  # bit-identical
    for screened_step, plain_step in zip(_complete_scores(screened), _complete_scores(plain), strict=True):
        assert screened_step.items() <= plain_step.items()
    assert sum(screened["screen_executions"]) > 0 and sum(unscreened["screen_executions"]) == 0
    assert sum(screened["head_executions"]) < sum(unscreened["head_executions"])
    assert screened["screen_topk"] == 8 and plain["screen_topk"] == 0


@pytest.mark.parametrize(
    ("method", "family", "layers", "blocks"),
    [("blockpruner", "llama", 4, 5), ("blockpruner", "gemma3_text", 4, 5), ("sleb", "qwen2", 8, 4)],
)
def test_carried_streams_change_no_score_and_save_branch_runs(method, family, layers, blocks):
    model = peaked_model(family, layers=layers)
    windows = sampled_windows(model, count=12)
    carried = schedule_of(method, model, windows, blocks=blocks)
    uncarried = schedule_of(method, model, windows, blocks=blocks, carry_mb=0)
    assert carried["order"] == uncarried["order"]
    # bit-identical, and the same candidates abandoned after the same windows
    assert carried["calibration_nll_sum"] == uncarried["calibration_nll_sum"]
    assert carried["candidate_ppl"] == uncarried["candidate_ppl"]
    assert sum(carried["carried_windows"]) > 0 and sum(uncarried["carried_windows"]) == 0
    assert sum(carried["branch_executions"]) < sum(uncarried["branch_executions"])
    assert carried["carry_mb"] == 2048 and uncarried["carry_mb"] == 0


def _scored_stack(model, windows, carry_bytes: int) -> BranchStack:
    """A stack over ``windows`` for the dense model, carrying streams up to ``carry_bytes`` (no step run yet)."""
    stack = BranchStack(model, adapter_for(model), windows, batch_size=2, cache=True, progress=False, carry_mb=1)
    stack.carry_bytes = carry_bytes  # tiny streams: a cap below 1 MiB makes the cap bite
    stack.set_removed([])
    return stack


def test_carried_streams_equal_the_prefix_cache_of_the_model_they_stand_for():
    model = peaked_model("llama", layers=4)
    windows = sampled_windows(model, count=6)
    with torch.no_grad():
        stack = _scored_stack(model, windows, 2**20)
        units = [Unit(kind, layer) for layer in range(4) for kind in (ATTN, MLP)]
        late = [Unit(ATTN, 3), Unit(MLP, 2)]
        run_step(stack, late + [u for u in units if u not in late], "best")
        removed = Unit(ATTN, 3).points  # any removal works: what stays carried is what it leaves unchanged
        stack.set_removed(removed)
        assert stack._carried, "no stream was carried over"
        for unit, batches in stack._carried.items():
            reference = BranchStack(model, adapter_for(model), windows, batch_size=2, cache=True, progress=False)
            reference.set_removed({*removed, *unit.points})
            for index, (point, stream) in batches.items():
                assert unit.points[0] < point <= removed[0]
                assert torch.equal(stream, reference.points[point][stack.batches[index]])
        stack.set_removed([])  # a removal undone: nothing carried is valid any more
        assert not stack._carried and stack._kept_bytes == 0


def test_carried_streams_respect_their_memory_cap():
    model = peaked_model("llama", layers=4)
    windows = sampled_windows(model, count=6)
    with torch.no_grad():
        one_stream = 2 * windows.seqlen * model.config.hidden_size * 4  # a batch of 2 windows, fp32
        stack = _scored_stack(model, windows, 3 * one_stream)
        units = [Unit(kind, layer) for layer in range(4) for kind in (ATTN, MLP)]
        run_step(stack, units, "best")
        kept = sum(len(streams) for batches in stack._captured.values() for streams in batches.values())
        assert kept == 3 and stack._kept_bytes == 3 * one_stream


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("topk", [1, 4, 64])
def test_screen_lower_bounds_never_exceed_the_exact_window_nll(topk, dtype):
    """A true bound in every dtype: no slack on the comparison (the bound carries its own rounding slack)."""
    model = peaked_model("qwen2", layers=3).to(dtype)
    windows = sampled_windows(model, count=4)
    gaps = []
    with torch.no_grad():
        stack = BranchStack(model, adapter_for(model), windows, batch_size=2, cache=True, progress=False,
                            screen_topk=topk)
        stack.set_removed([])
        screens = stack._head_screens()
        for skip in ([], [1], [0, 3], [2, 4, 5]):  # the current model and models with branches removed
            for rows, screen in zip(stack.batches, screens, strict=True):
                hidden = stack._suffix(0, stack.embedded[rows], frozenset(skip))
                exact = stack._window_nll(hidden, rows)
                for bound, value in zip(screen.lower_bounds(model, hidden), exact, strict=True):
                    assert 0 <= bound <= value
                    if not skip and topk == 64:
                        gaps.append((value - bound) / (windows.seqlen - 1))
    if gaps and dtype == torch.float32:
        assert max(gaps) < 0.02  # nats per token: still tight for the model it was built from


def test_fast_search_equals_plain_search_in_bf16():
    model = peaked_model("llama", layers=3).to(torch.bfloat16)
    windows = sampled_windows(model)
    fast = schedule_of("blockpruner", model, windows, blocks=3)
    plain = schedule_of("blockpruner", model, windows, blocks=3, search="plain")
    assert fast["order"] == plain["order"] and fast["calibration_nll_sum"] == plain["calibration_nll_sum"]


@pytest.mark.parametrize("method", ["blockpruner", "sleb"])
def test_each_step_takes_the_argmin_of_a_fresh_evaluation_of_every_candidate(method):
    """Every candidate of every step, materialised from the dense model and evaluated from scratch."""
    model = peaked_model("llama", layers=4)
    windows = sampled_windows(model)
    dense, adapter = copy.deepcopy(model), adapter_for(model)
    schedule = schedule_of(method, model, windows, blocks=2, search="plain")
    removed: list[Unit] = []
    for step, candidates in enumerate(schedule["candidate_ppl"]):
        fresh = {}
        for kind, layer, recorded, _ in candidates:
            unit = Unit(kind, layer)
            pruned = prunekit.apply_plan(copy.deepcopy(dense), plan_from_units(adapter, [*removed, unit]))
            fresh[unit] = perplexity(pruned, windows, progress=False).perplexity
            assert recorded == pytest.approx(fresh[unit], rel=1e-5)
        assert len(fresh) == schedule["candidates"][step]  # every eligible unit was scored
        best = min(fresh, key=lambda unit: (fresh[unit], unit.key))
        assert best.label() == schedule["order"][step]
        removed.append(best)


@pytest.mark.parametrize("abandon_bound", [None, "best", "runner_up"])
def test_exact_ties_keep_the_earliest_unit_in_any_order(abandon_bound):
    """Attention of layers 0 and 2 contributes exactly zero, so removing either leaves the same bits."""
    model = peaked_model("llama", layers=3)
    with torch.no_grad():
        for index in (0, 2):
            model.model.layers[index].self_attn.o_proj.weight.zero_()
    windows = sampled_windows(model)
    with torch.no_grad():
        stack = BranchStack(model, adapter_for(model), windows, batch_size=1, cache=True, progress=False)
        stack.set_removed([])
        order = [Unit(ATTN, 2), Unit(MLP, 1), Unit(ATTN, 0)]
        outcome = run_step(stack, order, abandon_bound)
    assert outcome.best == Unit(ATTN, 0) and outcome.runner_up == Unit(ATTN, 2)
    assert outcome.best_sum == outcome.runner_up_sum == stack.score().nll_sum


def test_both_sub_blocks_of_a_layer_remove_the_layer():
    adapter = adapter_for(peaked_model("llama", layers=3))
    plan = plan_from_units(adapter, [Unit(ATTN, 1), Unit(MLP, 2), Unit(MLP, 1)])
    assert [layer.layer_removed for layer in plan.layers] == [False, True, False]
    assert plan.layers[2].mlp_removed and plan.layers[2].has_attention


def test_ratio_target_picks_the_smallest_count_reaching_it_or_the_closest():
    model = peaked_model("llama", layers=3)
    windows = sampled_windows(model)
    reference = schedule_of("blockpruner", model, windows, blocks=4)
    ratios = reference["ratio_all"]
    goal = ratios[2] + 0.25 * (ratios[3] - ratios[2])  # between 2 and 3 removals, closer to 2
    plan, artifacts = run_method("blockpruner", model, windows, Target(goal))
    schedule = artifacts["blockpruner_schedule.json"]
    assert schedule["selected_blocks"] == 3 and len(schedule["order"]) == 3
    assert schedule["order"] == reference["order"][:3]
    assert predicted_ratios(plan, adapter_for(model)).ratio_all >= goal
    closest = schedule_of("blockpruner", model, windows, Target(goal), select="closest")
    assert closest["selected_blocks"] == 2 and closest["removed"] == reference["order"][:2]
    extra = schedule_of("blockpruner", model, windows, Target(goal), extra_steps=1)
    assert extra["selected_blocks"] == 3 and extra["order"] == reference["order"][:4]


def test_block_type_restricts_the_candidates():
    model = peaked_model("llama", layers=3)
    windows = sampled_windows(model, count=4)
    for block_type, kinds in (("attn", {"attn"}), ("mlp", {"mlp"})):
        schedule = schedule_of("blockpruner", model, windows, blocks=2, block_type=block_type)
        assert {kind for kind, _ in schedule["order"]} == kinds
        assert all(kind in kinds for step in schedule["candidate_ppl"] for kind, *_ in step)


@pytest.mark.parametrize(
    "options,target,pattern",
    [
        ({"blocks": 7}, None, "more than the 5 sub-blocks"),
        ({"block_type": "attn"}, Target(0.9), "out of reach"),
        ({"block_type": "ffn", "blocks": 1}, None, "block_type='ffn' .* takes one of mix, attn, mlp"),
        ({"search": "quick", "blocks": 1}, None, "search='quick' .* takes one of fast, prefix, plain"),
        ({"max_steps": 1, "blocks": 2}, None, "needs a state file"),
        ({}, None, "give either --ratio or --blocks"),
    ],
)
def test_bad_settings_fail_with_one_line(options, target, pattern):
    model = peaked_model("llama", layers=3)
    with pytest.raises(PrunekitError, match=pattern) as error:
        run_method("blockpruner", model, sampled_windows(model, count=2), target, **options)
    assert "\n" not in str(error.value)


def test_interrupted_search_resumes_to_the_same_schedule(tmp_path):
    model = peaked_model("llama", layers=4)
    windows = sampled_windows(model)
    reference = schedule_of("blockpruner", model, windows, blocks=5)
    state = tmp_path / "search.json"
    for done in (2, 4):
        with pytest.raises(PrunekitError, match=f"paused after 2 new steps \\({done} done\\)"):
            run_method("blockpruner", model, windows, blocks=5, state_path=str(state), max_steps=2)
        assert len(json.loads(state.read_text())["steps"]) == done
    resumed = schedule_of("blockpruner", model, windows, blocks=5, state_path=str(state))
    assert resumed["order"] == reference["order"]
    assert resumed["calibration_nll_sum"] == reference["calibration_nll_sum"]
    assert resumed["resumed_at_steps"] == [2, 4]
    shorter = schedule_of("blockpruner", model, windows, blocks=3, state_path=str(state), search="plain")
    assert shorter["removed"] == reference["order"][:3] and len(shorter["order"]) == 5  # nothing recomputed
    with pytest.raises(PrunekitError, match="belongs to another run"):
        run_method("blockpruner", model, sampled_windows(model, seed=1), blocks=5, state_path=str(state))
    with pytest.raises(PrunekitError, match="belongs to another run"):
        run_method("blockpruner", model, windows, blocks=3, state_path=str(state), block_type="attn")


def test_schedule_records_counts_timings_and_ratios():
    model = peaked_model("llama", layers=3)
    windows = sampled_windows(model, count=4)
    schedule = schedule_of("blockpruner", model, windows, blocks=2)
    assert len(schedule["calibration_ppl"]) == len(schedule["ratio_all"]) == 3
    assert schedule["calibration_ppl"][0] == pytest.approx(
        math.exp(schedule["calibration_nll_sum"][0] / (4 * (windows.seqlen - 1))))
    assert all(seconds >= 0 for seconds in schedule["seconds"])
    assert schedule["candidates"] == [6, 5]
    assert schedule["target"] == {"blocks": 2, "extra_steps": 0}
    assert schedule["ratio_all"][1:] == [pytest.approx(removal_ratios(adapter_for(model), [
        Unit(kind, layer) for kind, layer in schedule["order"][:k]])[0]) for k in (1, 2)]
    json.dumps(schedule, allow_nan=False)


@pytest.mark.parametrize(("runner_up", "margin", "exact", "expected"), [
    (["attn", 6], 0.0038, True, ", runner-up attn 6 +0.0038"),
    (["layer", 3], 0.0057, False, ", runner-up layer 3 >= +0.0057"),
    (None, 0.0013, False, ", every other candidate abandoned, margin >= +0.0013"),
    (None, None, True, ""),
])
def test_step_line_names_the_margin_even_when_every_other_candidate_was_abandoned(runner_up, margin, exact, expected):
    record = {"unit": ["layer", 25], "ppl": 12.8989, "runner_up": runner_up, "margin": margin, "margin_exact": exact,
              "ratio_all": 0.0526, "seconds": 731.5, "branch_executions": 43094, "head_executions": 218,
              "abandoned": 26, "candidates": 27}
    line = step_line("sleb", 2, record)
    assert line.startswith(f"sleb step 2: remove layer 25 -> calibration ppl 12.8989{expected}; ratio_all 5.26%;")
