"""Architecture adapters: where each model family keeps the parts that pruning touches.

An adapter answers, for one decoder-only family, which modules are the decoder layers, the q/k/v/o and
gate/up/down projections, which norms sit on the attention branch and which on the MLP branch (they are removed
with their branch), the attention shapes, and family specifics. Shapes are read from the config and checked
against the weights, never taken from module attributes that transformers has renamed in past refactors.

Norms are identified by role, not name: Llama's ``post_attention_layernorm`` is the *pre-MLP* norm, while
Gemma3's ``post_attention_layernorm`` is on the attention branch (Gemma3 has a separate pre-feedforward norm).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from prunekit.errors import PrunekitError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FamilySpec:
    """The static, per-family part of an adapter (module paths relative to one decoder layer)."""

    family: str
    attention: str = "self_attn"
    mlp: str = "mlp"
    attention_norms: tuple[str, ...] = ("input_layernorm",)
    mlp_norms: tuple[str, ...] = ("post_attention_layernorm",)
    qk_norms: tuple[str, ...] = ()
    sliding_window_layers: bool = False


FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec("llama"),
    "mistral": FamilySpec("mistral"),
    "qwen2": FamilySpec("qwen2", sliding_window_layers=True),
    "qwen3": FamilySpec("qwen3", qk_norms=("q_norm", "k_norm"), sliding_window_layers=True),
    "gemma3_text": FamilySpec(
        "gemma3_text",
        attention_norms=("input_layernorm", "post_attention_layernorm"),
        mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
        qk_norms=("q_norm", "k_norm"),
        sliding_window_layers=True,
    ),
}

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


@dataclass
class ArchAdapter:
    """Everything about one loaded model's architecture that pruning needs."""

    spec: FamilySpec
    num_layers: int
    hidden_size: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    attention_bias: bool
    mlp_bias: bool
    tied_embeddings: bool
    layer_types: list[str] | None = field(default=None)
    vocab_size: int = 0  # rows of the input embedding; parameter accounting needs it
    o_proj_bias: bool = False  # Qwen2 has q/k/v biases but none on o_proj

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def heads_per_group(self) -> int:
        """Query heads per KV head (g); 1 for MHA."""
        return self.num_heads // self.num_kv_heads

    # -- module access -------------------------------------------------------------------------------------
    @staticmethod
    def decoder_layers(model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    @staticmethod
    def set_decoder_layers(model: nn.Module, layers: nn.ModuleList) -> None:
        """Replace the decoder stack (materialisation drops removed layers)."""
        model.model.layers = layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.spec.attention)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.spec.mlp)

    def attention_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        attention = self.attention(layer)
        return {name: getattr(attention, name) for name in ATTENTION_PROJECTIONS}

    def mlp_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        mlp = self.mlp(layer)
        return {name: getattr(mlp, name) for name in MLP_PROJECTIONS}

    def attention_norm_modules(self, layer: nn.Module) -> dict[str, nn.Module]:
        return {name: getattr(layer, name) for name in self.spec.attention_norms}

    def mlp_norm_modules(self, layer: nn.Module) -> dict[str, nn.Module]:
        return {name: getattr(layer, name) for name in self.spec.mlp_norms}

    def qk_norm_modules(self, layer: nn.Module) -> dict[str, nn.Module]:
        attention = self.attention(layer)
        return {name: getattr(attention, name) for name in self.spec.qk_norms}

    def describe(self) -> dict:
        """Plain-data summary, for manifests and reports."""
        return {
            "family": self.family,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "head_dim": self.head_dim,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "tied_embeddings": self.tied_embeddings,
            "attention_norms": list(self.spec.attention_norms),
            "mlp_norms": list(self.spec.mlp_norms),
            "qk_norms": list(self.spec.qk_norms),
            "layer_types": self.layer_types,
            "vocab_size": self.vocab_size,
            "o_proj_bias": self.o_proj_bias,
        }


def family_spec(model_type: str) -> FamilySpec:
    """The family spec for a config ``model_type``, or a one-line error listing what is supported."""
    if model_type not in FAMILIES:
        hint = " (use the text-only Gemma3ForCausalLM checkpoint)" if model_type == "gemma3" else ""
        raise PrunekitError(
            f"unsupported architecture '{model_type}'{hint}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return FAMILIES[model_type]


def adapter_for(model: nn.Module) -> ArchAdapter:
    """Build the adapter of a loaded dense model (config values, checked against the weights)."""
    config = model.config
    spec = family_spec(getattr(config, "model_type", type(model).__name__))
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    adapter = ArchAdapter(
        spec=spec,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        head_dim=head_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=config.intermediate_size,
        attention_bias=_has_bias(model, spec.attention, "q_proj"),
        mlp_bias=_has_bias(model, spec.mlp, "gate_proj"),
        tied_embeddings=_embeddings_are_tied(model),
        layer_types=list(config.layer_types) if getattr(config, "layer_types", None) else None,
        vocab_size=model.get_input_embeddings().weight.shape[0],
        o_proj_bias=_has_bias(model, spec.attention, "o_proj"),
    )
    if num_heads % num_kv_heads:
        raise PrunekitError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
    _check_dense_shapes(model, adapter)
    return adapter


def _has_bias(model: nn.Module, block: str, linear: str) -> bool:
    """Whether a projection carries a bias, read from the weights: configs are not reliable here (Mistral ignores
    ``attention_bias``, only Llama honours ``mlp_bias``, Qwen2 biases q/k/v but not o_proj whatever the flag)."""
    for layer in model.model.layers:
        module = getattr(getattr(layer, block, None), linear, None)
        if module is not None:
            return module.bias is not None
    return False


def _embeddings_are_tied(model: nn.Module) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def _check_dense_shapes(model: nn.Module, adapter: ArchAdapter) -> None:
    """Fail early, with a clear message, if the weights do not have the shapes the config describes."""
    layers = adapter.decoder_layers(model)
    if len(layers) != adapter.num_layers:
        raise PrunekitError(f"config says {adapter.num_layers} layers but the model has {len(layers)}")
    d, dh = adapter.hidden_size, adapter.head_dim
    expected = {
        "q_proj": (adapter.num_heads * dh, d),
        "k_proj": (adapter.num_kv_heads * dh, d),
        "v_proj": (adapter.num_kv_heads * dh, d),
        "o_proj": (d, adapter.num_heads * dh),
        "gate_proj": (adapter.intermediate_size, d),
        "up_proj": (adapter.intermediate_size, d),
        "down_proj": (d, adapter.intermediate_size),
    }
    for index, layer in enumerate(layers):
        for name, linear in {**adapter.attention_linears(layer), **adapter.mlp_linears(layer)}.items():
            if tuple(linear.weight.shape) != expected[name]:
                raise PrunekitError(
                    f"layer {index} {name} has shape {tuple(linear.weight.shape)}, expected {expected[name]}; "
                    "is this a pruned checkpoint? load it with prunekit.load_pruned"
                )


def linear_weight_count(linears: dict[str, nn.Linear]) -> int:
    """Number of weight-matrix entries (no biases) in a set of linears."""
    return sum(linear.weight.numel() for linear in linears.values())


def _unique_parameters(module: nn.Module):
    """Each parameter tensor once, even when two modules share its storage (a tied embedding / lm_head)."""
    seen: set[int] = set()
    for parameter in module.parameters():
        # Meta tensors (an onloaded model) all report address 0: tell them apart by identity.
        key = parameter.data_ptr() if parameter.numel() and not parameter.is_meta else id(parameter)
        if key not in seen:
            seen.add(key)
            yield parameter


def unique_parameter_count(module: nn.Module) -> int:
    """Parameters counted once per tensor, so a tied embedding / lm_head matrix counts once."""
    return sum(parameter.numel() for parameter in _unique_parameters(module))


def parameter_bytes(module: nn.Module) -> int:
    """Bytes held by unique parameters."""
    return sum(parameter.numel() * parameter.element_size() for parameter in _unique_parameters(module))
