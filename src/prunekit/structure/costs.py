"""What one width unit costs in parameters: the one place these counts are written down.

A query head is its d_h rows of q_proj and its d_h columns of o_proj; a KV head its d_h rows of k_proj and of
v_proj; a KV group one KV head with its g query heads; an FFN channel one row of gate_proj and of up_proj and one
column of down_proj. ``weights`` counts weight-matrix entries only (what ``ratio_layers`` and the per-layer ratios of
SlimGPT, FLAP, Wanda-sp and LLM-Pruner act on); ``parameters`` adds the bias entries that go with the unit (what
``ratio_all`` counts). Biases that belong to the layer, not to a unit (o_proj's and down_proj's), are not a unit's.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunekit.models.adapters import ArchAdapter

KV_GROUP, QUERY_HEAD, KV_HEAD, CHANNEL = "kv_group", "query_head", "kv_head", "channel"


@dataclass(frozen=True)
class UnitCosts:
    """Weights and bias entries of each kind of width unit of one model (every decoder layer is alike)."""

    hidden_size: int
    head_dim: int
    heads_per_group: int
    attention_bias: bool
    mlp_bias: bool

    @classmethod
    def of(cls, adapter: ArchAdapter) -> UnitCosts:
        return cls(adapter.hidden_size, adapter.head_dim, adapter.heads_per_group, adapter.attention_bias,
                   adapter.mlp_bias)

    def weights(self, unit: str) -> int:
        """Weight-matrix entries removed with one ``unit``."""
        d, dh = self.hidden_size, self.head_dim
        head = 2 * d * dh  # q rows + o columns, or k rows + v rows
        return {QUERY_HEAD: head, KV_HEAD: head, KV_GROUP: self.heads_per_group * head + head,
                CHANNEL: 3 * d}[_known(unit)]

    def biases(self, unit: str) -> int:
        """Bias entries removed with one ``unit`` (q bias of a head, k and v biases, gate and up biases)."""
        dh = self.head_dim
        attention = {QUERY_HEAD: dh, KV_HEAD: 2 * dh, KV_GROUP: self.heads_per_group * dh + 2 * dh}
        if _known(unit) == CHANNEL:
            return 2 if self.mlp_bias else 0
        return attention[unit] if self.attention_bias else 0

    def parameters(self, unit: str) -> int:
        """Every parameter removed with one ``unit``: its weights and its biases."""
        return self.weights(unit) + self.biases(unit)

    def cost(self, unit: str, of: str) -> int:
        """The unit's cost in the measure a ratio target uses: ``"linear"`` (weights) or ``"all"`` (parameters)."""
        return self.weights(unit) if of == "linear" else self.parameters(unit)


def _known(unit: str) -> str:
    if unit not in (KV_GROUP, QUERY_HEAD, KV_HEAD, CHANNEL):
        raise ValueError(f"unknown width unit {unit!r}")
    return unit
