import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from prunekit.errors import PrunekitError
from prunekit.models.adapters import SUPPORTED_MODEL_TYPES, adapter_for, unique_parameter_count
from tests.conftest import FAMILIES, make_tiny_model

SHAPES = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("heads,kv_heads", SHAPES)
def test_adapter_fields_match_weight_shapes(family, heads, kv_heads):
    model = make_tiny_model(family, heads, kv_heads)
    adapter = adapter_for(model)
    d, dh = adapter.hidden_size, adapter.head_dim
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.heads_per_group) == (heads, kv_heads, heads // kv_heads)
    assert adapter.num_layers == len(adapter.decoder_layers(model)) == 3
    for layer in adapter.decoder_layers(model):
        attention = adapter.attention_linears(layer)
        mlp = adapter.mlp_linears(layer)
        assert attention["q_proj"].weight.shape == (heads * dh, d)
        assert attention["k_proj"].weight.shape == (kv_heads * dh, d)
        assert attention["v_proj"].weight.shape == (kv_heads * dh, d)
        assert attention["o_proj"].weight.shape == (d, heads * dh)
        assert mlp["gate_proj"].weight.shape == mlp["up_proj"].weight.shape == (adapter.intermediate_size, d)
        assert mlp["down_proj"].weight.shape == (d, adapter.intermediate_size)
        assert (attention["q_proj"].bias is not None) == adapter.attention_bias == (family == "qwen2")
        norms = {**adapter.attention_norm_modules(layer), **adapter.mlp_norm_modules(layer)}
        assert all(norm.weight.shape == (d,) for norm in norms.values())
        # every norm parameter of the layer belongs to exactly one branch
        layer_norms = {n for n, p in layer.named_parameters() if "norm" in n and "self_attn" not in n}
        assert {f"{name}.weight" for name in norms} == layer_norms
        for norm in adapter.qk_norm_modules(layer).values():
            assert norm.weight.shape == (dh,)
    assert bool(adapter.spec.qk_norms) == (family in ("qwen3", "gemma3_text"))


def test_norm_roles_differ_between_llama_and_gemma3():
    llama, gemma = adapter_for(make_tiny_model("llama")), adapter_for(make_tiny_model("gemma3_text"))
    assert llama.spec.mlp_norms == ("post_attention_layernorm",)
    assert "post_attention_layernorm" in gemma.spec.attention_norms
    assert gemma.spec.mlp_norms == ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def test_family_specifics():
    gemma = adapter_for(make_tiny_model("gemma3_text"))
    assert gemma.tied_embeddings and gemma.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    llama = adapter_for(make_tiny_model("llama"))
    assert not llama.tied_embeddings and llama.layer_types is None
    tied = adapter_for(make_tiny_model("llama", tie_word_embeddings=True))
    assert tied.tied_embeddings


def test_tied_embeddings_counted_once():
    tied = make_tiny_model("llama", tie_word_embeddings=True)
    untied = make_tiny_model("llama", tie_word_embeddings=False)
    vocab_times_d = 320 * 64
    assert unique_parameter_count(untied) - unique_parameter_count(tied) == vocab_times_d


def test_unsupported_architecture_lists_supported():
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(PrunekitError) as error:
        adapter_for(model)
    message = str(error.value)
    assert "gpt2" in message and all(name in message for name in SUPPORTED_MODEL_TYPES)
    assert "\n" not in message


def test_mis_shaped_weights_are_reported():
    model = make_tiny_model("llama")
    model.model.layers[1].mlp.down_proj.weight = torch.nn.Parameter(torch.zeros(64, 50))
    with pytest.raises(PrunekitError, match="layer 1 down_proj"):
        adapter_for(model)
