import math

import pytest
import torch
import torch.nn.functional as F

from prunekit.data import evaluation_windows
from prunekit.errors import PrunekitError
from prunekit.evaluation import perplexity
from tests.conftest import make_tiny_model


def _direct_perplexity(model, input_ids):
    """Independent reference: log-softmax and gather, one window at a time, in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in input_ids:
            logits = model(row[None]).logits[0].double()
            log_probs = F.log_softmax(logits[:-1], dim=-1)
            total -= log_probs.gather(1, row[1:, None]).sum().item()
            count += len(row) - 1
    return math.exp(total / count)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_matches_direct_cross_entropy(tiny_tokenizer, family):
    model = make_tiny_model(family)
    windows = evaluation_windows(tiny_tokenizer, "sample", seqlen=48, max_tokens=48 * 7)
    result = perplexity(model, windows, batch_size=3, progress=False)
    assert result.windows == 7 and result.scored_tokens == 7 * 47
    assert result.perplexity == pytest.approx(_direct_perplexity(model, windows.input_ids), rel=1e-5)


def test_batch_size_does_not_change_the_result(tiny_tokenizer):
    model = make_tiny_model("qwen3")
    windows = evaluation_windows(tiny_tokenizer, "sample", seqlen=32, max_tokens=32 * 5)
    one = perplexity(model, windows, batch_size=1, progress=False).perplexity
    five = perplexity(model, windows, batch_size=5, progress=False).perplexity
    assert one == pytest.approx(five, rel=1e-5)


def test_bf16_model_is_scored_with_fp32_log_softmax(tiny_tokenizer):
    model = make_tiny_model("llama").to(torch.bfloat16)
    windows = evaluation_windows(tiny_tokenizer, "sample", seqlen=32, max_tokens=64)
    result = perplexity(model, windows, progress=False)
    assert result.dtype == "bfloat16"
    with torch.no_grad():
        logits = model(windows.input_ids).logits.float()
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows.input_ids[:, 1:].reshape(-1))
    assert result.perplexity == pytest.approx(math.exp(reference.item()), rel=1e-5)


def test_non_finite_loss_is_an_error(tiny_tokenizer):
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    windows = evaluation_windows(tiny_tokenizer, "sample", seqlen=32, max_tokens=64)
    with pytest.raises(PrunekitError, match="non-finite"):
        perplexity(model, windows, progress=False)
