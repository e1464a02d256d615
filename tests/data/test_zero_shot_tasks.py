"""The offline zero-shot suite: deterministic, well-formed, and the committed files are what the builder makes."""

from __future__ import annotations

import json

import pytest

from prunekit.data.zero_shot_tasks import CHOICES, CORPORA, TASK_FILES, clean_paragraph, write_items
from prunekit.evaluation.zero_shot import LOCAL_TASKS_DIR


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    write_items(first, seed=0)
    write_items(second, seed=0)
    return first, second


def test_same_seed_same_bytes_and_committed_files_match(built):
    first, second = built
    for name in TASK_FILES.values():
        assert (first / name).read_bytes() == (second / name).read_bytes()
        assert (first / name).read_bytes() == (LOCAL_TASKS_DIR / name).read_bytes(), (
            f"{name} differs from the builder's output: rerun tools/build_zero_shot_tasks.py")


def test_another_seed_gives_other_items(tmp_path, built):
    write_items(tmp_path, seed=1)
    assert (tmp_path / "continuation.jsonl").read_bytes() != (built[0] / "continuation.jsonl").read_bytes()


def _items(name: str) -> list[dict]:
    return [json.loads(line) for line in (LOCAL_TASKS_DIR / name).read_text().splitlines()]


def test_continuation_items_are_well_formed_balanced_and_interleaved():
    items = _items("continuation.jsonl")
    assert len(items) == 400
    assert [item["corpus"] for item in items[:8]] == [*CORPORA, *CORPORA]
    labels = [item["label"] for item in items]
    assert all(0 <= label < CHOICES for label in labels) and len(set(labels)) == CHOICES
    for item in items:
        assert len(item["choices"]) == CHOICES == len(set(item["choices"]))
        assert item["context"] and all(choice for choice in item["choices"])
    assert len({item["context"] for item in items}) == len(items)


def test_lastword_items_end_in_a_word():
    items = _items("lastword.jsonl")
    assert len(items) == 400
    assert all(item["target"].isalpha() and len(item["target"]) >= 3 for item in items)
    assert all(not item["context"].endswith(" ") for item in items)


def test_clean_paragraph_drops_markup_and_keeps_prose():
    assert clean_paragraph(".. function:: open(file)") is None
    assert clean_paragraph("def f():\n    return 1") is None
    assert clean_paragraph("   A one-line indented sentence.") == "A one-line indented sentence."
    assert clean_paragraph("Use :func:`open` to read\na file.") == "Use open to read a file."
    assert clean_paragraph("See :ref:`the tutorial <tut>` first.") == "See the tutorial first."
    assert clean_paragraph("Call :func:`~os.path.join` or :meth:`str.split`.") == "Call join or str.split."
