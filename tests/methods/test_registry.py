"""Methods as typed configs plus capabilities: registration, option parsing, the listing, eval mode."""

from dataclasses import dataclass

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.methods import (
    Capabilities,
    MethodConfig,
    MethodResult,
    Target,
    available_methods,
    method_info,
    option,
    prune,
    register,
)
from prunekit.report.methods import describe_methods
from tests.conftest import make_tiny_model


def test_registry_rejects_a_duplicate_name_and_untyped_options():
    @dataclass(frozen=True)
    class Plain(MethodConfig):
        pass

    with pytest.raises(ValueError, match="'slimgpt' is already registered"):
        register("slimgpt", config=Plain, capabilities=Capabilities("width"), description="again")(lambda c: None)

    @dataclass(frozen=True)
    class Untyped(MethodConfig):
        level: tuple = option((), "not a supported option type")

    with pytest.raises(TypeError, match="option types are bool, int, float, str"):
        register("untyped-test", config=Untyped, capabilities=Capabilities("width"), description="x")(lambda c: None)
    assert "untyped-test" not in available_methods()


@pytest.mark.parametrize("options,pattern", [
    ({"dgs_min": "0"}, "dgs_min takes an integer >= 1"),
    ({"dgs_min": 0.5}, "dgs_min takes an integer >= 1"),
    ({"dgs_min": True}, "dgs_min takes an integer >= 1"),
    ({"schedule": "flat"}, "schedule takes one of log_increase, uniform"),
    ({"compensate": "maybe"}, "compensate takes true or false"),
    ({"ratio_cap": "0"}, r"ratio_cap takes a number in \(0, 1\]"),
    ({"damping": "nan"}, "damping takes a number >= 0"),
    ({"dgs_min": "128", "dgs_max": "64"}, "dgs_min=128 of 'slimgpt' is above dgs_max=64"),
    ({"warp": "1"}, "has no option 'warp'"),
])
def test_bad_options_are_one_line_errors_naming_what_is_accepted(options, pattern):
    with pytest.raises(PrunekitError, match=pattern) as error:
        method_info("slimgpt").configure(options)
    assert "\n" not in str(error.value)


def test_options_parse_text_and_values_alike():
    text = method_info("slimgpt").configure({"damping": "0", "compensate": "no", "last_ratio": "none",
                                             "dgs_max": "512"})
    values = method_info("slimgpt").configure({"damping": 0, "compensate": False, "last_ratio": None,
                                               "dgs_max": 512})
    assert text == values and text.damping == 0.0 and text.compensate is False and text.last_ratio is None


def test_listing_shows_capabilities_and_every_public_option_with_type_default_and_help():
    listing = describe_methods(available_methods().values())
    for method in available_methods().values():
        assert f"{method.name}: {method.description}" in listing
        for spec in method.config.options():
            assert (f"\n  {spec.name} " in listing) != spec.internal  # a row for every public option only
    words = " ".join(listing.split())  # the capability line wraps
    assert "width (heads, channels); calibration 65,536 tokens in windows of 512; gradients: no, edits weights: yes" \
        in words and "depth (blocks, layers)" in words and "resumable: yes, nested results: yes" in words
    assert "dgs_min           int            64" in listing
    assert "screen_topk" not in listing and "screen_topk" in describe_methods(available_methods().values(), True)


@pytest.mark.parametrize("method,options", [("slimgpt", {}), ("blockpruner", {"blocks": 1})])
def test_every_method_runs_in_eval_mode_whatever_mode_it_is_given(tiny_tokenizer, method, options):
    """With dropout active a train-mode forward is random; the method must score in eval mode regardless."""
    from prunekit.data import calibration_windows

    windows = calibration_windows(tiny_tokenizer, "sample", 8 * 32, seqlen=32, seed=0)
    results = []
    for train in (False, True):
        model = make_tiny_model("llama", layers=3, attention_dropout=0.5).train(train)
        torch.manual_seed(train)  # different dropout draws, were dropout active
        result = prune(model, tiny_tokenizer, method, None if options else 0.3, calibration=windows,
                       progress=False, **options)
        results.append(result)
        assert not model.training  # prune leaves the pruned model ready for inference
    assert results[0].plan.to_dict()["layers"] == results[1].plan.to_dict()["layers"]
    for a, b in zip(results[0].model.state_dict().values(), results[1].model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_method_must_return_a_method_result():
    from prunekit.methods.base import _REGISTRY

    @dataclass(frozen=True)
    class Empty(MethodConfig):
        pass

    register("returns-a-plan-test", config=Empty, capabilities=Capabilities("width", needs_calibration=False),
             description="returns the wrong type")(lambda context: "a plan")
    try:
        with pytest.raises(TypeError, match="not MethodResult"):
            method_info("returns-a-plan-test").apply_to(make_tiny_model("llama"), Target(0.2), progress=False)
    finally:
        del _REGISTRY["returns-a-plan-test"]
    assert issubclass(MethodResult, object)
