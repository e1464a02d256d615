import pytest
import torch

from prunekit.calibration import HESSIAN, MOMENTS, NORMS, InputStatistics, LayerwiseRunner
from prunekit.errors import PrunekitError
from prunekit.models.adapters import adapter_for
from tests.calibration.helpers import sliding_model, token_windows

ALL = (HESSIAN, NORMS, MOMENTS)


def recorded_inputs(module):
    """A plain hook keeping every input batch, to compute the statistics directly."""
    batches = []
    handle = module.register_forward_pre_hook(lambda _, args: batches.append(args[0].detach().clone()))
    return batches, handle


def check_against_direct(stats, batches, rtol=1e-5):
    x = torch.cat([batch.reshape(-1, batch.shape[-1]) for batch in batches]).double()
    assert stats.tokens == x.shape[0] and stats.sequences == sum(batch.shape[0] for batch in batches)
    assert stats.xtx.dtype == torch.float32
    torch.testing.assert_close(stats.gram().double(), x.T @ x, rtol=rtol, atol=1e-4)
    torch.testing.assert_close(stats.hessian().double(), 2 * x.T @ x / x.shape[0], rtol=rtol, atol=1e-6)
    expected = 2 * x.T @ x / stats.sequences
    torch.testing.assert_close(stats.hessian(per="sequence").double(), expected, rtol=rtol, atol=1e-5)
    torch.testing.assert_close(stats.feature_norms().double(), x.norm(dim=0), rtol=rtol, atol=1e-6)
    torch.testing.assert_close(stats.mean().double(), x.mean(dim=0), rtol=rtol, atol=1e-6)
    torch.testing.assert_close(stats.variance().double(), x.var(dim=0, unbiased=True), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hooked_statistics_equal_direct_computation(dtype):
    model = sliding_model("gemma3_text").to(dtype)
    adapter = adapter_for(model)
    with LayerwiseRunner(model, adapter, token_windows(5), batch_size=2, progress=False) as runner:
        runner.advance(0)
        layer = adapter.decoder_layers(model)[1]
        linears = {"q_proj": adapter.attention_linears(layer)["q_proj"], **adapter.mlp_linears(layer)}
        recorded = {name: recorded_inputs(linear) for name, linear in linears.items()}
        stats = runner.collect(1, linears, kinds=ALL)
        for name, (batches, handle) in recorded.items():
            handle.remove()
            assert batches[0].dtype == dtype
            check_against_direct(stats[name], batches)
        assert stats["down_proj"].xtx.shape == (96, 96)


def test_advance_collects_in_the_same_pass():
    model = sliding_model("llama")
    adapter = adapter_for(model)
    with LayerwiseRunner(model, adapter, token_windows(3), progress=False) as runner:
        o_proj = adapter.attention_linears(adapter.decoder_layers(model)[0])["o_proj"]
        batches, handle = recorded_inputs(o_proj)
        stats = runner.advance(0, {"o_proj": o_proj}, kinds=(NORMS,))
        handle.remove()
    torch.testing.assert_close(stats["o_proj"].feature_norms().double(),
                               torch.cat([b.reshape(-1, 64) for b in batches]).double().norm(dim=0))
    with pytest.raises(PrunekitError, match="'hessian' statistics were not collected"):
        stats["o_proj"].hessian()


def test_variance_is_stable_for_a_large_mean():
    generator = torch.Generator().manual_seed(0)
    data = 1e4 + 1e-2 * torch.randn(40, 25, 3, generator=generator)
    stats = InputStatistics(3, (MOMENTS,))
    for chunk in data.split(7):
        stats.update(chunk)
    direct = data.reshape(-1, 3).double().var(dim=0)
    torch.testing.assert_close(stats.variance().double(), direct, rtol=1e-4, atol=0)
    assert stats.sequences == 40 and stats.tokens == 1000


def test_statistics_reject_bad_requests():
    with pytest.raises(PrunekitError, match="unknown statistic 'hesian'"):
        InputStatistics(4, ("hesian",))
    stats = InputStatistics(4, ALL)
    with pytest.raises(PrunekitError, match="no inputs were seen"):
        stats.hessian()
    with pytest.raises(PrunekitError, match="has 5 features"):
        stats.update(torch.zeros(2, 5))
    stats.update(torch.ones(1, 4))
    with pytest.raises(PrunekitError, match="at least 2 tokens"):
        stats.variance()
    with pytest.raises(PrunekitError, match="unknown Hessian normalisation"):
        stats.hessian(per="window")


def test_the_gram_matrix_is_accumulated_in_row_blocks_and_exactly_symmetric():
    # 2,100 features: two row blocks (about 4 M elements each); only the upper blocks are multiplied
    torch.manual_seed(0)
    stats = InputStatistics(2100, (HESSIAN,))
    batches = [torch.randn(2, 3, 2100), torch.randn(1, 5, 2100)]
    for batch in batches:
        stats.update(batch)
    gram = stats.gram()
    x = torch.cat([batch.reshape(-1, 2100) for batch in batches]).double()
    torch.testing.assert_close(gram.double(), x.T @ x, rtol=1e-5, atol=1e-4)
    assert torch.equal(gram, gram.T)
