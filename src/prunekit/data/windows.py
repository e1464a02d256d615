"""Token windows for calibration and evaluation, following the perplexity protocol.

Protocol: the records of a split are joined with a blank line and tokenised once, without special tokens. BOS is
handled by mode:

- ``none``: no BOS anywhere;
- ``stream``: one BOS before the whole stream (what the Llama-family papers did), none per window;
- ``window``: every window is BOS followed by L - 1 text tokens;
- ``auto`` (default): ``stream`` when the tokenizer adds a BOS by default (Llama 2/3, Gemma), ``none`` when it
  does not (SmolLM2, Qwen: their BOS is a chat-template token, not a document start).

The stream is cut into non-overlapping windows of exactly L tokens; the remainder is dropped. Evaluation takes
windows from the start of the evaluation split. Calibration takes ``sequential`` windows from the start of the
calibration split or ``random`` ones (a seeded sample without replacement of the aligned windows). Calibration
and evaluation windows come from disjoint splits, so they can never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prunekit.data.corpora import MIX, CorpusText, corpus_label, load_corpus
from prunekit.data.token_cache import cached_ids
from prunekit.errors import PrunekitError

BOS_MODES = ("auto", "none", "stream", "window")
SAMPLING = ("sequential", "random")
# A text is cut (at a record boundary) to about this many characters per needed token before tokenising, so a
# 100 MB corpus is not tokenised to take 64k tokens; generous for every tokenizer we have seen (about 4).
_CHARS_PER_TOKEN_BOUND = 12


@dataclass
class TokenWindows:
    """Windows of token ids ``[n, seqlen]`` and how they were made."""

    input_ids: torch.Tensor
    source: str
    split: str
    seqlen: int
    bos: str
    sampling: str
    seed: int | None
    stream_tokens: int
    window_starts: list[int] = field(default_factory=list)
    parts: dict[str, int] = field(default_factory=dict)  # a mix: windows taken from each member, in order

    @property
    def num_windows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def describe(self) -> dict:
        return {
            "source": self.source,
            "split": self.split,
            "seqlen": self.seqlen,
            "windows": self.num_windows,
            "tokens": self.num_tokens,
            "bos": self.bos,
            "sampling": self.sampling,
            "seed": self.seed,
            **({"parts": dict(self.parts)} if self.parts else {}),
        }


def resolve_bos(tokenizer, bos: str) -> str:
    """Turn ``auto`` into ``stream`` or ``none`` for this tokenizer; validate the mode."""
    if bos == "every_window":
        bos = "window"
    if bos not in BOS_MODES:
        raise PrunekitError(f"unknown BOS mode '{bos}'; use one of: {', '.join(BOS_MODES)}")
    if bos != "auto":
        if bos != "none" and tokenizer.bos_token_id is None:
            raise PrunekitError(f"BOS mode '{bos}' asked for, but this tokenizer has no BOS token; use --bos none")
        return bos
    if tokenizer.bos_token_id is None:
        return "none"
    adds_bos = tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
    return "stream" if adds_bos else "none"


def tokenize_stream(tokenizer, corpus: CorpusText, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of the joined records, without special tokens; cut early when ``max_tokens`` allows."""
    records = corpus.records
    if max_tokens is not None:
        budget, kept = max_tokens * _CHARS_PER_TOKEN_BOUND, []
        for record in records:
            kept.append(record)
            budget -= len(record) + 2
            if budget <= 0:
                break
        records = kept
    return cached_ids(tokenizer, "\n\n".join(records),
                      lambda text: tokenizer(text, add_special_tokens=False).input_ids)


def _cut_windows(stream: torch.Tensor, seqlen: int, bos: str, bos_id: int | None) -> tuple[torch.Tensor, list[int]]:
    if bos == "stream":
        stream = torch.cat([torch.tensor([bos_id]), stream])
    step = seqlen - 1 if bos == "window" else seqlen
    count = len(stream) // step
    body = stream[: count * step].view(count, step)
    if bos == "window":
        body = torch.cat([torch.full((count, 1), bos_id, dtype=torch.long), body], dim=1)
    return body, [index * step for index in range(count)]


def check_one_window(tokens: int, tokens_flag: str, seqlen: int, seqlen_flag: str = "--seqlen") -> None:
    """A token budget must hold at least one window; the one-line error names both options."""
    if tokens < seqlen:
        raise PrunekitError(f"{tokens_flag} {tokens} is less than one window of {seqlen_flag} {seqlen}")


def _check_seqlen(seqlen: int) -> None:
    if seqlen < 2:
        raise PrunekitError(f"--seqlen must be at least 2 tokens, got {seqlen}")


def evaluation_windows(
    tokenizer,
    source: str,
    seqlen: int = 2048,
    max_tokens: int | None = None,
    bos: str = "auto",
    split: str = "evaluation",
) -> TokenWindows:
    """Consecutive windows from the start of a corpus's evaluation split (at most ``max_tokens`` tokens)."""
    _check_seqlen(seqlen)
    if max_tokens is not None and max_tokens < seqlen:
        raise PrunekitError(f"evaluating at most {max_tokens} tokens is less than one window of {seqlen}; "
                            "raise the token count or lower the window length")
    if source == "mix":
        count = None if max_tokens is None else max_tokens // seqlen
        return _mixed(lambda member, share: evaluation_windows(
            tokenizer, member, seqlen, None if share is None else share * seqlen, bos, split), count, split, seqlen)
    mode = resolve_bos(tokenizer, bos)
    corpus = load_corpus(source, split)
    stream = tokenize_stream(tokenizer, corpus, None if max_tokens is None else max_tokens + seqlen)
    windows, starts = _cut_windows(stream, seqlen, mode, tokenizer.bos_token_id)
    if max_tokens is not None:
        windows, starts = windows[: max_tokens // seqlen], starts[: max_tokens // seqlen]
    if len(windows) == 0:
        raise PrunekitError(
            f"'{corpus_label(source)}' {split} split has {len(stream)} tokens, fewer than one window of {seqlen}; "
            "use a shorter --seqlen or more text"
        )
    return TokenWindows(windows, corpus_label(source), split, seqlen, mode, "sequential", None, len(stream), starts)


def calibration_windows(
    tokenizer,
    source: str,
    num_tokens: int,
    seqlen: int = 2048,
    sampling: str = "random",
    seed: int = 0,
    bos: str = "auto",
    split: str = "calibration",
) -> TokenWindows:
    """``num_tokens // seqlen`` windows of the calibration split, ``sequential`` or seeded ``random``."""
    _check_seqlen(seqlen)
    if sampling not in SAMPLING:
        raise PrunekitError(f"unknown window sampling '{sampling}'; use sequential or random")
    check_one_window(num_tokens, "--calib-tokens", seqlen)
    count = num_tokens // seqlen
    if source == "mix":
        return _mixed(lambda member, share: calibration_windows(
            tokenizer, member, share * seqlen, seqlen, sampling, seed, bos, split), count, split, seqlen)
    mode = resolve_bos(tokenizer, bos)
    corpus = load_corpus(source, split)
    limit = (count + 1) * seqlen if sampling == "sequential" else None
    stream = tokenize_stream(tokenizer, corpus, limit)
    windows, starts = _cut_windows(stream, seqlen, mode, tokenizer.bos_token_id)
    if len(windows) < count:
        raise PrunekitError(
            f"'{corpus_label(source)}' {split} split has only {len(windows)} windows of {seqlen} tokens, "
            f"{count} asked for; lower --calib-tokens or use a larger corpus"
        )
    if sampling == "random":
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(windows), generator=generator)[:count].sort().values
    else:
        chosen = torch.arange(count)
    picked_starts = [starts[i] for i in chosen.tolist()]
    return TokenWindows(
        windows[chosen], corpus_label(source), split, seqlen, mode, sampling, seed, len(stream), picked_starts
    )


def mix_shares(count: int, weights: dict[str, int] = MIX) -> dict[str, int]:
    """``count`` windows split over the mix members by weight (largest remainders; ties to the earlier member)."""
    total = sum(weights.values())
    exact = {member: count * weight / total for member, weight in weights.items()}
    shares = {member: int(value) for member, value in exact.items()}
    by_remainder = sorted(weights, key=lambda member: -(exact[member] - shares[member]))
    for member in by_remainder[: count - sum(shares.values())]:
        shares[member] += 1
    return shares


def _mixed(windows_of, count: int | None, split: str, seqlen: int) -> TokenWindows:
    """The mix: each member's share of windows (all of each member's when ``count`` is None), concatenated."""
    shares = {member: None for member in MIX} if count is None else mix_shares(count)
    parts = [windows_of(member, share) for member, share in shares.items() if share != 0]
    first = parts[0]
    return TokenWindows(
        torch.cat([part.input_ids for part in parts]), "mix", split, seqlen, first.bos, first.sampling, first.seed,
        sum(part.stream_tokens for part in parts), [start for part in parts for start in part.window_starts],
        {part.source: part.num_windows for part in parts},
    )
