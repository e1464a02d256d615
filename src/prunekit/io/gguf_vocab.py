"""The tokenizer part of a GGUF file: vocabulary, token types, merges, special tokens and chat template.

prunekit writes byte-level BPE tokenizers (llama.cpp's ``gpt2`` tokenizer model: SmolLM2, Llama 3, Qwen2). llama.cpp
picks its pre-tokenizer (how text is split before BPE) by name, so the name is derived from the tokenizer's own
``pre_tokenizer`` definition, and a definition that matches none of the names prunekit knows is refused rather than
guessed: a wrong pre-tokenizer silently tokenizes numbers or whitespace differently. SentencePiece-style tokenizers
(Llama 2, Mistral: ``byte_fallback`` BPE with a Metaspace pre-tokenizer) are not written yet.

Special token ids, whether BOS / EOS are added, the merges and the chat template are read by the ``gguf`` package's
own ``SpecialVocab`` from the tokenizer files saved to a temporary folder, so they follow llama.cpp's converter.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

import gguf

from prunekit.errors import PrunekitError

# Split patterns of Llama 3 and Qwen2 (single digits), held in a Split pre-tokenizer before a regex-free ByteLevel,
# by llama.cpp's name for them.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
SPLIT_NAMES = {LLAMA3_PATTERN: "llama-bpe", QWEN2_PATTERN: "qwen2"}


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_rows: int) -> tuple[str, str | None]:
    """Write ``tokenizer`` into ``writer`` for a model with ``vocab_rows`` embedding rows; returns the pre-tokenizer
    name llama.cpp will use and a note on what llama.cpp does differently (or None)."""
    definition = _definition(tokenizer)
    pre = pre_tokenizer_name(definition)
    note = None
    if (definition.get("normalizer") or {}).get("type") == "NFC":
        note = ("llama.cpp does not apply the tokenizer's NFC normalizer (as its own converter): text that is not "
                "already NFC may tokenize differently")
    tokens, types = token_table(tokenizer, vocab_rows)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="prunekit-gguf-vocab-") as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise PrunekitError("the tokenizer has no BPE merges; export --gguf writes byte-level BPE tokenizers only")
    special.add_to_gguf(writer, quiet=True)
    return pre, note


def _definition(tokenizer: Any) -> dict[str, Any]:
    if tokenizer is None:
        raise PrunekitError("the model has no tokenizer; export --gguf writes the tokenizer into the file, so load "
                            "a checkpoint that has its tokenizer files")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise PrunekitError(f"tokenizer {type(tokenizer).__name__} has no tokenizer.json (fast tokenizer); "
                            "export --gguf needs one")
    definition = json.loads(backend.to_str())
    model = definition.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style (byte_fallback BPE)" if model.get("byte_fallback") else model.get("type")
        raise PrunekitError(f"tokenizer type {kind} is not supported by export --gguf; it writes byte-level BPE "
                            "tokenizers (SmolLM2, Llama 3) only")
    return definition


def pre_tokenizer_name(definition: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, or a one-line error when none matches exactly."""
    normalizer = definition.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        raise PrunekitError(f"the tokenizer has a {normalizer.get('type')} normalizer, which llama.cpp's byte-level "
                            "BPE tokenizers lack; export --gguf cannot reproduce it")
    steps = _pre_steps(definition.get("pre_tokenizer"))
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # single digits first, then the GPT-2 split
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern in SPLIT_NAMES:
            return SPLIT_NAMES[pattern]
    raise PrunekitError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) matches none "
                        "that prunekit maps to llama.cpp (gpt-2, smollm, llama-bpe, qwen2); export --gguf refuses "
                        "to guess")


def _pre_steps(pre_tokenizer: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not pre_tokenizer:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return list(pre_tokenizer.get("pretokenizers") or [])
    return [pre_tokenizer]


def token_table(tokenizer: Any, vocab_rows: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types by id, padded with unused tokens up to the embedding's rows."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_rows:
        raise PrunekitError(f"the tokenizer has token id {max(by_id)} but the embedding only {vocab_rows} rows; "
                            "tokenizer and model do not belong together")
    added = {index: token.special for index, token in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for index in range(vocab_rows):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            special = added.get(index)
            types.append(gguf.TokenType.NORMAL if special is None
                         else gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    return tokens, [int(kind) for kind in types]
