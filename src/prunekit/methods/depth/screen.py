"""The screened LM head: a cheap lower bound of a window's NLL sum that holds in every model dtype.

The LM head costs as much as ~10 SmolLM2 layers per window, and most candidates of a depth search lose by a few
percent. So a candidate first gets, per window, a lower bound from a subset S of the vocabulary (every target plus
the current model's top-k tokens at every position): ``LSE_S(z) - z_target <= LSE(z) - z_target = NLL``. In exact
arithmetic that is all. In floating point the exact score is computed differently (the full head in the model's
dtype, a fp32 cross-entropy, a fp32 sum per window), and a subset log-sum-exp has been measured above the full one by
3.8e-6 on one fp32 token; in bf16 the head's outputs are rounded to 8 bits, so the gap can reach a tenth of a nat.
The bound therefore carries slack from standard rounding-error bounds (u = unit roundoff, n = hidden size):

1. Logits. The exact path's logit ``z_j`` and ours (fp32 from the same normed hidden state h and weights) both lie
   within ``gamma_n(u_acc) * |h|.|W_j|`` of the true dot product; the exact path then rounds its result to the model
   dtype (and, for Gemma, soft-caps it in that dtype), and its final norm may differ from ours by one rounding per
   element; soft-capping is 1-Lipschitz and adds a few roundings on either side. Hence
   ``|z_j - ours_j| <= 4 (u_model + u_fp32) |ours_j| + (2 n u_acc + 2 u_model) |h|.|W_j|``, with ``|h|.|W_j|``
   computed (one more subset product; about half the Cauchy-Schwarz bound ``||h|| ||W_j||`` on SmolLM2). We lower
   every subset logit and raise the target logit by that ``delta_j``.
2. Cross-entropy in fp32 over V logits (max-shifted log-sum-exp): the computed value is at least
   ``NLL (1 - 3 u) - (2.37 V + 4) u`` with u the fp32 roundoff (the sum of V exponentials has relative error at most
   ``2.37 V u``). It is never negative, so a token's bound is clamped at 0.
3. The window's fp32 sum of non-negative terms is at least ``(1 - gamma_T)`` times their exact sum.

The bound is computed in float64, so its own rounding is negligible, and shrunk by a further 1e-9 for it.
Assumptions, named: matrix products accumulate in fp32 or wider (true for the oneDNN CPU kernels; on CUDA we fall
back to the model dtype's roundoff when torch allows reduced-precision reductions, and count TF32 inputs), and
round-to-nearest. On SmolLM2 in fp32 the slack adds 0.016 nats per token (0.55% of the NLL) to the subset's own gap
of 0.023, so it costs some screening power; in bf16 it costs most of it. It never changes a chosen unit (the tests
check the bound token by token in bf16 and fp32, and fast against plain search).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.calibration.branches import softcap_logits

FP32_ROUNDOFF = 2.0**-24
ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: FP32_ROUNDOFF, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
OWN_ROUNDING = 1e-9  # relative shrink covering the float64 computation of the bound itself


def _roundoff(dtype: torch.dtype) -> float:
    return ROUNDOFF.get(dtype, 2.0**-8)


def _gemm_roundoff(dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(roundoff of the accumulation, roundoff of the inputs as multiplied) of the model's head matmul."""
    accumulate, inputs = min(_roundoff(dtype), FP32_ROUNDOFF), 0.0
    if device.type == "cuda":
        matmul = torch.backends.cuda.matmul
        if dtype == torch.bfloat16 and matmul.allow_bf16_reduced_precision_reduction:
            accumulate = _roundoff(torch.bfloat16)
        if dtype == torch.float16 and matmul.allow_fp16_reduced_precision_reduction:
            accumulate = _roundoff(torch.float16)
        if dtype == torch.float32 and matmul.allow_tf32:
            inputs = 2.0**-11
    return accumulate, inputs


@dataclass(frozen=True)
class HeadScreen:
    """For one batch of windows: a vocabulary subset holding every target, and where each target sits in it."""

    vocabulary: torch.Tensor  # sorted token ids
    target_columns: torch.Tensor  # [b, L - 1]

    @classmethod
    def build(cls, logits: torch.Tensor, input_ids: torch.Tensor, topk: int) -> HeadScreen:
        targets = input_ids[:, 1:].to(logits.device)
        top = logits[:, :-1].topk(min(topk, logits.shape[-1]), dim=-1).indices
        vocabulary = torch.unique(torch.cat([top.flatten(), targets.flatten()]))
        return cls(vocabulary, torch.searchsorted(vocabulary, targets.contiguous()))

    def lower_bounds(self, model: nn.Module, hidden: torch.Tensor) -> list[float]:
        """Per window, a lower bound of the NLL sum the exact path computes (module docstring)."""
        head = model.get_output_embeddings()
        normed = model.model.norm(hidden[:, :-1])
        weight = head.weight[self.vocabulary]
        bias = head.bias[self.vocabulary].float() if getattr(head, "bias", None) is not None else None
        raw = F.linear(normed.float(), weight.float(), bias)
        slack = self._logit_slack(raw, normed, weight, head.weight.dtype)
        logits = softcap_logits(model, raw).double()
        target = logits.gather(-1, self.target_columns.unsqueeze(-1)).squeeze(-1)
        target_slack = slack.gather(-1, self.target_columns.unsqueeze(-1)).squeeze(-1)
        token = torch.logsumexp(logits - slack, dim=-1) - (target + target_slack)
        vocabulary_size = head.weight.shape[0]
        token = token * (1 - 3 * FP32_ROUNDOFF) - (2.37 * vocabulary_size + 4) * FP32_ROUNDOFF
        length = token.shape[1]
        window = token.clamp(min=0).sum(dim=1) * (1 - length * FP32_ROUNDOFF) * (1 - OWN_ROUNDING)
        return window.tolist()

    @staticmethod
    def _logit_slack(raw: torch.Tensor, normed: torch.Tensor, weight: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
        """``delta_j`` per position and subset token (module docstring, point 1), in float64."""
        accumulate, inputs = _gemm_roundoff(dtype, raw.device)
        model_roundoff, size = _roundoff(dtype), normed.shape[-1]
        # |h|.|W_j| itself, in fp32: a sum of non-negative terms, so its own relative error is below size * u_fp32
        magnitudes = F.linear(normed.float().abs(), weight.float().abs()).double() * (1 + 2 * size * FP32_ROUNDOFF)
        scale = 2 * size * accumulate + 2 * model_roundoff + 2 * inputs
        return 4 * (model_roundoff + FP32_ROUNDOFF) * raw.double().abs() + scale * magnitudes
