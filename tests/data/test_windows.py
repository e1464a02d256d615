import random
import shutil
from pathlib import Path

import pytest
import torch

from prunekit.data import calibration_windows, evaluation_windows, resolve_bos
from prunekit.errors import PrunekitError


def _ngrams(windows, n=16):
    rows = windows.input_ids.tolist()
    return {tuple(row[i : i + n]) for row in rows for i in range(0, len(row) - n + 1)}


@pytest.fixture
def unique_text(tmp_path):
    """Paragraphs of random words: any shared 16-token run between two windows means shared text."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    path = tmp_path / "unique.txt"
    path.write_text("\n\n".join(" ".join(rng.choices(words, k=60)) for _ in range(300)))
    return path


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_calibration_and_evaluation_windows_never_overlap(tiny_tokenizer, unique_text, sampling):
    """Disjoint by construction (different records); checked here on the tokens themselves."""
    calibration = calibration_windows(tiny_tokenizer, unique_text, 64 * 100, seqlen=64, sampling=sampling, seed=3)
    evaluation = evaluation_windows(tiny_tokenizer, unique_text, seqlen=64)
    assert calibration.split == "calibration" and evaluation.split == "evaluation"
    assert not _ngrams(calibration) & _ngrams(evaluation)
    # the check itself can fail: the whole corpus's windows do overlap with the evaluation windows
    whole = evaluation_windows(tiny_tokenizer, unique_text, seqlen=64, split="all")
    assert _ngrams(whole) & _ngrams(evaluation)


def test_windows_are_exact_non_overlapping_slices_of_the_stream(tiny_tokenizer):
    windows = evaluation_windows(tiny_tokenizer, "sample", seqlen=32, max_tokens=32 * 10, bos="none")
    assert windows.input_ids.shape == (10, 32)
    assert windows.window_starts == [32 * i for i in range(10)]
    flat = windows.input_ids.reshape(-1)
    text_ids = tiny_tokenizer("\n\n".join(__import__("prunekit").data.load_corpus("sample").records[:3]),
                              add_special_tokens=False).input_ids
    assert flat.tolist() == text_ids[: len(flat)]


def test_random_sampling_is_seeded_and_recorded(tiny_tokenizer):
    first = calibration_windows(tiny_tokenizer, "sample", 64 * 8, seqlen=64, sampling="random", seed=7)
    again = calibration_windows(tiny_tokenizer, "sample", 64 * 8, seqlen=64, sampling="random", seed=7)
    other = calibration_windows(tiny_tokenizer, "sample", 64 * 8, seqlen=64, sampling="random", seed=8)
    assert torch.equal(first.input_ids, again.input_ids)
    assert not torch.equal(first.input_ids, other.input_ids)
    assert first.describe()["seed"] == 7 and first.describe()["tokens"] == 512
    assert len(set(first.window_starts)) == 8


def test_bos_modes(tiny_tokenizer):
    bos = tiny_tokenizer.bos_token_id
    stream = evaluation_windows(tiny_tokenizer, "sample", seqlen=16, max_tokens=64, bos="stream")
    window = evaluation_windows(tiny_tokenizer, "sample", seqlen=16, max_tokens=64, bos="window")
    none = evaluation_windows(tiny_tokenizer, "sample", seqlen=16, max_tokens=64, bos="none")
    assert stream.input_ids[0, 0] == bos and (stream.input_ids[1:, 0] != bos).all()
    assert (window.input_ids[:, 0] == bos).all()
    assert torch.equal(stream.input_ids[0, 1:], none.input_ids[0, :-1])
    assert torch.equal(window.input_ids[1, 1:], none.input_ids.reshape(-1)[15:30])
    # this tokenizer does not add BOS by itself, so auto means none
    assert resolve_bos(tiny_tokenizer, "auto") == "none"


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda t: evaluation_windows(t, "sample", seqlen=1), "at least 2"),
        (lambda t: calibration_windows(t, "sample", 10, seqlen=64), "less than one window"),
        (lambda t: calibration_windows(t, "sample", 64 * 10**6, seqlen=64), "lower --calib-tokens"),
        (lambda t: calibration_windows(t, "sample", 640, seqlen=64, sampling="shuffled"), "sequential or random"),
        (lambda t: evaluation_windows(t, "sample", bos="start"), "unknown BOS mode"),
    ],
)
def test_bad_window_requests(tiny_tokenizer, call, pattern):
    with pytest.raises(PrunekitError, match=pattern):
        call(tiny_tokenizer)


def test_mix_shares_follow_the_weights_and_add_up():
    from prunekit.data.windows import mix_shares

    assert mix_shares(32) == {"sample": 5, "kjv": 5, "pydocs": 11, "fortunes": 11}
    assert mix_shares(6) == {"sample": 1, "kjv": 1, "pydocs": 2, "fortunes": 2}
    for count in range(0, 40):
        shares = mix_shares(count)
        assert sum(shares.values()) == count and max(shares.values()) - 2 * min(shares.values()) <= 2


@pytest.mark.skipif(not Path("/usr/share/games/fortunes").is_dir() or shutil.which("bible") is None,
                    reason="Debian corpora missing (make corpora)")
def test_mix_windows_are_each_members_own_windows(tiny_tokenizer):
    from prunekit.data import calibration_windows, evaluation_windows

    mixed = calibration_windows(tiny_tokenizer, "mix", 12 * 32, 32, seed=3)
    assert mixed.describe()["parts"] == {"sample": 2, "kjv": 2, "pydocs": 4, "fortunes": 4}
    members = [calibration_windows(tiny_tokenizer, name, count * 32, 32, seed=3).input_ids
               for name, count in mixed.parts.items()]
    assert torch.equal(mixed.input_ids, torch.cat(members))
    held_out = evaluation_windows(tiny_tokenizer, "mix", 32, 6 * 32)
    assert held_out.num_windows == 6 and held_out.split == "evaluation" and sum(held_out.parts.values()) == 6
