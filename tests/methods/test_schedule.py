import pytest

from prunekit.errors import PrunekitError
from prunekit.methods.schedule import log_increasing_ratios, uniform_ratios, unit_counts
from prunekit.models.adapters import adapter_for
from tests.conftest import make_tiny_model


@pytest.mark.parametrize("target,last", [(0.20, 0.272), (0.25, 0.340), (0.33, 0.449), (0.50, 0.680)])
def test_published_last_layer_ratios_for_32_layers(target, last):
    ratios = log_increasing_ratios(32, target)
    assert ratios[0] == 0.0 and ratios[-1] == pytest.approx(last, abs=1e-3)
    assert sum(ratios) / 32 == pytest.approx(target, abs=1e-9)
    assert ratios == sorted(ratios)


def test_cap_is_respected_and_mean_still_hits_target():
    ratios = log_increasing_ratios(30, 0.7)
    assert max(ratios) == pytest.approx(0.9)
    assert sum(ratios) / 30 == pytest.approx(0.7, abs=1e-9)


def test_infeasible_and_out_of_range_targets():
    with pytest.raises(PrunekitError, match="cannot remove"):
        log_increasing_ratios(30, 0.89)
    with pytest.raises(PrunekitError, match="out of range"):
        uniform_ratios(30, 1.2)


def test_unit_counts_match_layer_parameters():
    adapter = adapter_for(make_tiny_model("llama", heads=8, kv_heads=4))  # d 64, dh 16, g 2, d_ff 96
    counts = unit_counts(0.4, adapter)
    layer = (2 * 8 + 2 * 4) * 64 * 16 + 96 * 3 * 64
    removed = counts.attention_units * 64 * 16 * 6 + counts.channels * 3 * 64
    assert counts.attention_units == 2
    assert abs(removed - 0.4 * layer) <= 3 * 64 / 2
    paper = unit_counts(0.4, adapter, match_parameters=False)
    assert paper.channels == round(0.4 * 96)
    assert unit_counts(0.99, adapter).attention_units == 3  # at least one KV group stays
