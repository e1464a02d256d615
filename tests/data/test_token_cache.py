"""The token cache: a second tokenisation of the same text by the same tokenizer reads the ids from disk."""

import torch

from prunekit.data import token_cache


def test_cached_ids_are_reused_and_keyed_by_text_and_tokenizer(tmp_path, monkeypatch, tiny_tokenizer):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(token_cache, "MIN_CHARS", 10)
    calls = []

    def encode(text):
        calls.append(text)
        return tiny_tokenizer(text, add_special_tokens=False).input_ids

    text = "In the beginning was the word, and the word was cached. " * 20
    first = token_cache.cached_ids(tiny_tokenizer, text, encode)
    second = token_cache.cached_ids(tiny_tokenizer, text, encode)
    assert torch.equal(first, second) and first.dtype == torch.long and len(calls) == 1
    token_cache.cached_ids(tiny_tokenizer, text + " more", encode)
    assert len(calls) == 2
    for entry in (tmp_path / "tokens").glob("*.npy"):
        entry.write_bytes(b"damaged")
    assert torch.equal(token_cache.cached_ids(tiny_tokenizer, text, encode), first)  # recomputed, not crashed
    assert token_cache.cached_ids(tiny_tokenizer, "short", encode).numel() > 0 and len(calls) == 4
