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
   ``|z_j - ours_j| <= 4 (u_model + u_fp32) |ours_j| + (2 n u_acc + 2 u_model) ||h|| ||W_j||`` (Cauchy-Schwarz for
   ``|h|.|W_j|``; computing ``|h|.|W_j|`` itself halves this term on SmolLM2 but costs one more subset product,
   which was slower overall). We lower every subset logit and raise the target logit by that ``delta_j``.
2. Cross-entropy in fp32 over V logits (max-shifted log-sum-exp): the computed value is at least
   ``NLL (1 - 3 u) - (2.37 V + 4) u`` with u the fp32 roundoff (the sum of V exponentials has relative error at most
   ``2.37 V u``). It is never negative, so a token's bound is clamped at 0.
3. The window's fp32 sum of non-negative terms is at least ``(1 - gamma_T)`` times their exact sum.

The bound is computed in fp32 (float64 only per token): its own rounding is bounded the same way (point 2 for the
subset's log-sum-exp) and subtracted too; a final 1e-9 covers the float64 sums.
Assumptions, named: matrix products accumulate in fp32 or wider (true for the oneDNN CPU kernels; on CUDA we fall
back to the model dtype's roundoff when torch allows reduced-precision reductions, and count TF32 inputs), and
round-to-nearest. On SmolLM2 in fp32 the slack adds about 0.024 nats per token (0.8% of the NLL) to the subset's
own gap of 0.023, so it costs some screening power; in bf16 it costs most of it. The bound takes 18 ms per
512-token window there, against 13 ms without slack and 220 ms for the full head. It never changes a chosen unit
(the tests check the bound token by token in bf16 and fp32, and fast against plain search).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.calibration.branches import softcap_logits

FP32_ROUNDOFF = 2.0**-24
ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: FP32_ROUNDOFF, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
OWN_ROUNDING = 1e-9  # relative shrink covering the float64 per-token and per-window sums of the bound


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
        raw = F.linear(normed.float(), weight.float(), bias)  # [b, T, S]
        relative, absolute = self._slack_factors(head.weight.dtype, raw.device, normed.shape[-1])
        row_norms, weight_norms = normed.float().norm(dim=-1), weight.float().norm(dim=-1)  # [b, T], [S]
        columns = self.target_columns.unsqueeze(-1)
        target_raw = raw.gather(-1, columns).squeeze(-1)
        target = softcap_logits(model, target_raw).double()
        target_slack = (relative * target_raw.abs().double()
                        + absolute * row_norms.double() * weight_norms[self.target_columns].double())
        largest = raw.abs().amax(dim=-1).double()
        # delta_j = relative |raw_j| + absolute ||h|| ||W_j||, subtracted in place, in two passes
        shifted = softcap_logits(model, raw) - raw.abs().mul_(relative)
        shifted.baddbmm_(row_norms.unsqueeze(-1), weight_norms.expand(len(raw), 1, -1), alpha=-absolute)
        top = torch.logsumexp(shifted, dim=-1).double()
        token = top - target - target_slack
        # our own fp32 rounding: subset log-sum-exp (module docstring, point 2 with the subset's size), the
        # subtractions of the slack and of the target (all logits and slacks are at most ``bound`` in size)
        bound = largest * (1 + relative) + absolute * row_norms.double() * float(weight_norms.max())
        token -= (2.37 * len(self.vocabulary) + 8) * FP32_ROUNDOFF + 4 * FP32_ROUNDOFF * (top.abs() + 2 * bound)
        vocabulary_size = head.weight.shape[0]
        token = token * (1 - 3 * FP32_ROUNDOFF) - (2.37 * vocabulary_size + 4) * FP32_ROUNDOFF
        length = token.shape[1]
        window = token.clamp(min=0).sum(dim=1) * (1 - length * FP32_ROUNDOFF) * (1 - OWN_ROUNDING)
        return window.tolist()

    @staticmethod
    def _slack_factors(dtype: torch.dtype, device: torch.device, size: int) -> tuple[float, float]:
        """(factor of |logit|, factor of ||h|| ||W_j||) of ``delta_j`` (module docstring, point 1), rounded up so the
        fp32 arithmetic that applies them cannot make the slack smaller than the bound."""
        accumulate, inputs = _gemm_roundoff(dtype, device)
        model_roundoff = _roundoff(dtype)
        relative = 4 * (model_roundoff + FP32_ROUNDOFF)
        absolute = 2 * size * accumulate + 2 * model_roundoff + 2 * inputs
        return relative * (1 + 1e-4), absolute * (1 + 1e-4)
