"""Checkpoints reload exactly, in a fresh process; damaged ones fail with a one-line error naming the problem."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import prunekit
from prunekit.errors import PrunekitError
from prunekit.io.checkpoint import WEIGHTS_NAME
from prunekit.structure import PruningPlan
from tests.conftest import FAMILIES, make_tiny_model, requires_smollm2

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])

# Loads a checkpoint in a new interpreter and writes its logits and greedy tokens next to it.
FRESH_PROCESS = """
import sys, torch
from safetensors.torch import save_file
import prunekit
from transformers import AutoModelForCausalLM
directory, via_auto = sys.argv[1], sys.argv[2] == "auto"
model = AutoModelForCausalLM.from_pretrained(directory) if via_auto else prunekit.load_pruned(directory)[0]
ids = torch.tensor([[int(t) for t in sys.argv[3].split(",")]])
with torch.no_grad():
    logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
save_file({"logits": logits.contiguous(), "tokens": tokens}, directory + "/fresh.safetensors")
"""


def mixed_plan(adapter):
    """Head, KV-group, channel, attention-block, MLP-block and whole-layer removal in one plan."""
    plan = PruningPlan.keep_all(adapter, method="manual")
    g, n_kv = adapter.heads_per_group, adapter.num_kv_heads
    if n_kv > 1:
        plan.keep_kv_groups(1, list(range(1, n_kv)))  # drop KV group 0
    if g > 1:  # one query head fewer in every group of layer 2
        plan.keep_heads(2, [h for h in range(adapter.num_heads) if h % g != 0])
    elif n_kv > 2:
        plan.keep_heads(2, list(range(1, adapter.num_heads)))
    plan.keep_channels(2, list(range(0, adapter.intermediate_size, 3)))
    plan.remove_attention(0)
    plan.remove_mlp(3)
    plan.remove_layer(4)
    return plan


def _in_fresh_process(directory, via="prunekit"):
    token_ids = ",".join(map(str, IDS[0].tolist()))
    code = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(directory), via, token_ids],
                          capture_output=True, text=True, timeout=600)
    assert code.returncode == 0, code.stderr[-3000:]
    return load_file(directory / "fresh.safetensors")


def _pruned_tiny(family, heads=4, kv_heads=2):
    model = make_tiny_model(family, heads, kv_heads, layers=6)
    plan = mixed_plan(prunekit.adapter_for(model))
    return prunekit.apply_plan(model, plan)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_in_a_fresh_process_is_exact(tmp_path, tiny_tokenizer, family):
    model = _pruned_tiny(family)
    prunekit.save_pruned(model, tiny_tokenizer, tmp_path / "ckpt")
    with torch.no_grad():
        logits = model(IDS).logits
        tokens = model.generate(IDS, max_new_tokens=8, do_sample=False, use_cache=True)
    fresh = _in_fresh_process(tmp_path / "ckpt")
    assert torch.equal(fresh["logits"], logits)
    assert torch.equal(fresh["tokens"], tokens)


def test_auto_model_loads_a_prunekit_checkpoint(tmp_path, tiny_tokenizer):
    model = _pruned_tiny("qwen2", 4, 4)
    prunekit.save_pruned(model, tiny_tokenizer, tmp_path / "ckpt")
    fresh = _in_fresh_process(tmp_path / "ckpt", via="auto")
    with torch.no_grad():
        assert torch.equal(fresh["logits"], model(IDS).logits)


def test_checkpoint_contents_and_manifest(tmp_path, tiny_tokenizer):
    model = _pruned_tiny("llama")
    prunekit.save_pruned(model, tiny_tokenizer, tmp_path / "ckpt", {"metrics": {"note": 1}})
    names = {path.name for path in (tmp_path / "ckpt").iterdir()}
    assert {"model.safetensors", "config.json", "prunekit.json", "tokenizer.json"} <= names
    manifest = json.loads((tmp_path / "ckpt" / "prunekit.json").read_text())
    assert manifest["plan"]["layers"][4]["layer_removed"] and manifest["metrics"] == {"note": 1}
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"] == "prunekit"
    loaded, tokenizer = prunekit.load_model(tmp_path / "ckpt")  # load_model accepts a pruned directory
    assert tokenizer is not None and loaded.prunekit_plan.to_dict()["layers"] == model.prunekit_plan.to_dict()["layers"]


def test_truncated_weights_fail_with_one_line_naming_the_file(tmp_path):
    prunekit.save_pruned(_pruned_tiny("llama"), None, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(PrunekitError, match="model.safetensors") as error:
        prunekit.load_pruned(tmp_path / "ckpt", with_tokenizer=False)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("change,pattern", [
    ("drop", "lacks tensor model.layers.1.self_attn.k_proj.weight"),
    ("extra", "unexpected tensor extra.weight"),
    ("reshape", "tensor model.layers.1.self_attn.k_proj.weight has shape"),
])
def test_missing_unexpected_or_misshaped_tensor_is_named(tmp_path, change, pattern):
    prunekit.save_pruned(_pruned_tiny("llama"), None, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS_NAME
    tensors = load_file(weights)
    name = "model.layers.1.self_attn.k_proj.weight"
    if change == "drop":
        del tensors[name]
    elif change == "extra":
        tensors["extra.weight"] = torch.zeros(2)
    else:
        tensors[name] = torch.zeros(3, 64)
    save_file(tensors, weights)
    with pytest.raises(PrunekitError, match="does not match the SHA-256 in prunekit.json"):
        prunekit.load_pruned(tmp_path / "ckpt", with_tokenizer=False)
    with pytest.raises(PrunekitError, match=pattern):  # the strict load names the tensor
        prunekit.load_pruned(tmp_path / "ckpt", with_tokenizer=False, verify=False)


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch):
    model = _pruned_tiny("llama")
    prunekit.save_pruned(model, None, tmp_path / "ckpt")
    with pytest.raises(PrunekitError, match="already exists"):
        prunekit.save_pruned(model, None, tmp_path / "ckpt")

    class Exploding:
        def save_pretrained(self, directory):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        prunekit.save_pruned(model, Exploding(), tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_unpruned_model_cannot_be_saved(tmp_path):
    with pytest.raises(PrunekitError, match="no pruning plan"):
        prunekit.save_pruned(make_tiny_model("llama"), None, tmp_path / "x")


def test_uniform_export_loads_without_prunekit(tmp_path, tiny_tokenizer):
    model = make_tiny_model("qwen3", 4, 2, layers=4)
    adapter = prunekit.adapter_for(model)
    plan = PruningPlan.keep_all(adapter)
    for index in (0, 1, 3):
        plan.keep_kv_groups(index, [1])
        plan.keep_channels(index, list(range(0, 96, 2)))
    plan.remove_layer(2)
    prunekit.apply_plan(model, plan)
    from prunekit.io.export import export_uniform

    export_uniform(model, tiny_tokenizer, tmp_path / "plain")
    script = ("import sys, torch; from transformers import AutoModelForCausalLM; "
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); assert 'prunekit' not in sys.modules; "
              "from safetensors.torch import save_file; "
              "save_file({'l': m(torch.tensor([[1, 17, 42, 99]])).logits}, sys.argv[1] + '/l.safetensors')")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "plain")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        expected = model(torch.tensor([[1, 17, 42, 99]])).logits
    assert torch.equal(load_file(tmp_path / "plain" / "l.safetensors")["l"], expected)


def test_non_uniform_export_is_refused(tmp_path):
    with pytest.raises(PrunekitError, match="cannot export uniformly: layer 0 has its attention block removed"):
        from prunekit.io.export import export_uniform

        export_uniform(_pruned_tiny("llama"), None, tmp_path / "plain")


@requires_smollm2
def test_smollm2_mixed_plan_round_trip(tmp_path, smollm2):
    import copy

    model, tokenizer = smollm2
    pruned = prunekit.apply_plan(copy.deepcopy(model), mixed_plan(prunekit.adapter_for(model)))
    prunekit.save_pruned(pruned, tokenizer, tmp_path / "ckpt")
    with torch.no_grad():
        logits = pruned(IDS).logits
        tokens = pruned.generate(IDS, max_new_tokens=8, do_sample=False, use_cache=True)
    fresh = _in_fresh_process(tmp_path / "ckpt")
    assert torch.equal(fresh["logits"], logits) and torch.equal(fresh["tokens"], tokens)


def _with_added_biases(family):
    """A mixed plan on a model without output biases, plus biases a method added (random, as FLAP's would be)."""
    model = make_tiny_model(family, 4, 2, layers=6)
    assert all(layer.self_attn.o_proj.bias is None and layer.mlp.down_proj.bias is None for layer in model.model.layers)
    plan = mixed_plan(prunekit.adapter_for(model))
    plan.added_biases, plan.weights_edited = ["o_proj", "down_proj"], True
    generator = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            linear.bias = torch.nn.Parameter(torch.randn(64, generator=generator))
    return prunekit.apply_plan(model, plan, edited_weights=True)


@pytest.mark.parametrize("via", ["prunekit", "auto"])
def test_biases_added_by_pruning_round_trip_exactly_through_both_loaders(tmp_path, tiny_tokenizer, via):
    from prunekit.structure.params import measured_ratios, predicted_ratios

    model = _with_added_biases("llama")
    adapter = prunekit.adapter_for(make_tiny_model("llama", 4, 2, layers=6))
    assert measured_ratios(model, adapter).to_dict() == predicted_ratios(model.prunekit_plan, adapter).to_dict()
    prunekit.save_pruned(model, tiny_tokenizer, tmp_path / "ckpt")
    with torch.no_grad():
        logits = model(IDS).logits
        tokens = model.generate(IDS, max_new_tokens=8, do_sample=False, use_cache=True)
    fresh = _in_fresh_process(tmp_path / "ckpt", via=via)
    assert torch.equal(fresh["logits"], logits) and torch.equal(fresh["tokens"], tokens)
    reloaded, _ = prunekit.load_pruned(tmp_path / "ckpt", with_tokenizer=False)
    assert reloaded.model.layers[1].self_attn.o_proj.bias is not None


def test_a_weight_editing_plan_is_refused_on_a_fresh_dense_model():
    plan = _with_added_biases("qwen3").prunekit_plan
    with pytest.raises(PrunekitError, match="edited the kept weights.*load the checkpoint the plan came from"):
        prunekit.apply_plan(make_tiny_model("qwen3", 4, 2, layers=6), plan)
    with pytest.raises(PrunekitError, match="only o_proj, down_proj can gain one"):
        PruningPlan.from_dict({**plan.to_dict(), "added_biases": ["q_proj"]})
    old = plan.to_dict()
    del old["weights_edited"], old["added_biases"]  # a plan written before these fields existed
    assert PruningPlan.from_dict(old).weights_edited is None and PruningPlan.from_dict(old).added_biases == []


ORDERS = {
    "transformers first": "import transformers, prunekit",
    "prunekit first": "import prunekit, transformers",
    "transformers imported by prunekit's own loader": "import prunekit; prunekit.load_pruned(d, with_tokenizer=False)",
}


@pytest.mark.parametrize("order", ORDERS)
def test_auto_model_registration_works_whatever_imports_transformers_first(tmp_path, order):
    prunekit.save_pruned(_pruned_tiny("llama"), None, tmp_path / "ckpt")
    script = (f"import sys; d = sys.argv[1]; {ORDERS[order]}\n"
              "from transformers import AutoModelForCausalLM\n"
              "print(type(AutoModelForCausalLM.from_pretrained(d)).__name__)")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ckpt")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "LlamaForCausalLM" and "could not register" not in done.stderr
