"""The tokenizer part of a GGUF file: vocabulary, token types, merges or scores, special tokens and chat template.

Two kinds of tokenizer are written, both from the tokenizer's own ``tokenizer.json`` definition:

- byte-level BPE (llama.cpp's ``gpt2`` tokenizer model: SmolLM2, Llama 3, Qwen2). llama.cpp picks its pre-tokenizer
  (how text is split before BPE) by name, so the name is derived from the tokenizer's ``pre_tokenizer``; a
  definition that matches none of the names prunekit knows is refused rather than guessed, since a wrong
  pre-tokenizer silently tokenizes numbers or whitespace differently.
- SentencePiece-style BPE with byte fallback (llama.cpp's ``llama`` tokenizer model: Llama 2, Mistral 7B). llama.cpp
  merges the adjacent pair whose merged token has the highest *score*, where BPE merges the pair of lowest *rank*;
  each token's score is therefore minus the rank of the first merge that produces it (tokens no merge produces get
  the lowest score). The ``gguf`` package's own reader of such tokenizer.json files gives every token the same
  placeholder score, which would merge in the wrong order. Whether a space is prepended comes from the Metaspace
  pre-tokenizer or a Prepend normalizer.

Special token ids, whether BOS / EOS are added, the merges (byte-level BPE) and the chat template are read by the
``gguf`` package's ``SpecialVocab`` from the tokenizer files saved to a temporary folder, as llama.cpp's converter
does.
"""

from __future__ import annotations

import json
import re
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
    name llama.cpp will use (``sentencepiece`` for the second kind) and a note on what llama.cpp does differently
    (or None)."""
    definition = _definition(tokenizer)
    if definition["model"].get("byte_fallback"):
        _add_sentencepiece_bpe(writer, tokenizer, definition, vocab_rows)
        return "sentencepiece", None
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
    special = _special_vocab(tokenizer, len(tokens), load_merges=True)
    if not special.merges:
        raise PrunekitError("the tokenizer has no BPE merges; export --gguf writes byte-level BPE tokenizers only")
    special.add_to_gguf(writer, quiet=True)
    return pre, note


def _special_vocab(tokenizer: Any, vocab_size: int, load_merges: bool) -> gguf.SpecialVocab:
    """Special ids, add-BOS/EOS, chat template (and merges) as gguf's converter reads them from the saved files."""
    with tempfile.TemporaryDirectory(prefix="prunekit-gguf-vocab-") as folder:
        tokenizer.save_pretrained(folder)
        return gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=vocab_size)


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
    if model.get("type") != "BPE":
        raise PrunekitError(f"tokenizer type {model.get('type')} is not supported by export --gguf; it writes BPE "
                            "tokenizers (byte-level: SmolLM2, Llama 3, Qwen2; byte-fallback: Llama 2, Mistral)")
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


def _add_sentencepiece_bpe(writer: gguf.GGUFWriter, tokenizer: Any, definition: dict[str, Any],
                           vocab_rows: int) -> None:
    """llama.cpp's ``llama`` tokenizer model: tokens, scores from merge ranks, types with byte tokens."""
    tokens, types = token_table(tokenizer, vocab_rows)
    for index, token in enumerate(tokens):
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types[index] = int(gguf.TokenType.BYTE)
    if tokenizer.unk_token_id is not None:
        types[tokenizer.unk_token_id] = int(gguf.TokenType.UNKNOWN)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(merge_scores(definition["model"], tokens))
    writer.add_token_types(types)
    writer.add_add_space_prefix(_prepends_space(definition))
    _special_vocab(tokenizer, len(tokens), load_merges=False).add_to_gguf(writer, quiet=True)


def merge_scores(model: dict[str, Any], tokens: list[str]) -> list[float]:
    """Minus the rank of the first merge producing each token; the lowest score for tokens no merge produces."""
    merges = model.get("merges") or []
    lowest = -float(len(merges) + 1)
    scores = dict.fromkeys(tokens, lowest)
    for rank, merge in reversed(list(enumerate(merges))):  # reversed: the first (lowest-rank) producer wins
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if left + right in scores:
            scores[left + right] = -float(rank)
    return [scores[token] for token in tokens]


def _prepends_space(definition: dict[str, Any]) -> bool:
    """Whether the tokenizer puts a U+2581 before the text (Metaspace ``first`` / ``always``, or a Prepend)."""
    steps = _pre_steps(definition.get("pre_tokenizer"))
    normalizer = definition.get("normalizer") or {}
    normalizers = normalizer.get("normalizers", [normalizer]) if normalizer else []
    if any(step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never" for step in steps):
        return True
    return any(step.get("type") == "Prepend" for step in normalizers)
