"""A disk cache of tokenised corpus text, so random calibration windows of a large corpus cost seconds once.

Random window sampling needs the whole split tokenised (the mix's members run to 10 MB of text: 10 to 25 s on two
cores). The token ids of a text are cached under ``<cache>/tokens/`` by the SHA-256 of the tokenizer's serialised
form and of the text, as a plain ``.npy`` array read without pickle. Only texts above ``MIN_CHARS`` are cached; a
tokenizer that cannot be serialised is never cached. Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from prunekit._paths import cache_dir

MIN_CHARS = 200_000


def _tokenizer_digest(tokenizer) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def cached_ids(tokenizer, text: str, encode: Callable[[str], list[int]]) -> torch.Tensor:
    """``encode(text)`` as a tensor, from the cache when this tokenizer has tokenised this text before."""
    digest = _tokenizer_digest(tokenizer) if len(text) >= MIN_CHARS else None
    if digest is None:
        return torch.tensor(encode(text), dtype=torch.long)
    key = hashlib.sha256(f"{digest}\n".encode() + text.encode("utf-8")).hexdigest()
    path = cache_dir() / "tokens" / f"{key}.npy"
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
        except (OSError, ValueError):
            pass  # a damaged entry is recomputed and replaced
    ids = torch.tensor(encode(text), dtype=torch.long)
    _store(path, ids)
    return ids


def _store(path: Path, ids: torch.Tensor) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(handle, "wb") as stream:
            np.save(stream, ids.numpy().astype(np.int32), allow_pickle=False)
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only cache only costs time
