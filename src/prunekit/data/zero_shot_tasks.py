"""The offline zero-shot task suite: items built, seeded, from the evaluation splits of the project's corpora.

Standard zero-shot tasks (PIQA, HellaSwag, ...) need their data from the Hugging Face hub. This suite needs none:
its items are drawn from the public-domain corpora prunekit already uses (``data.corpora``), always from their
evaluation splits, so no item is calibration text. Two tasks, each with an equal number of items from ``kjv``,
``pydocs``, ``fortunes`` and ``jargon``:

- ``prunekit_continuation``: which of four endings really follows the context? The context is ``CONTEXT_WORDS``
  words of a passage starting at a sentence start; the true ending is the next ``ENDING_WORDS`` words; the three
  distractors are spans of the same length from other passages of the same corpus (a HellaSwag-like 4-way
  multiple choice, scored by log-likelihood: ``acc`` and the byte-length normalised ``acc_norm``).
- ``prunekit_lastword``: predict the last word of a sentence from the ``LASTWORD_CONTEXT_WORDS`` words before it
  (LAMBADA-like: ``acc`` is 1 when greedy decoding yields exactly the word).

Items alternate between the corpora, so the first N items of a task (lm-eval's ``limit``) are balanced too.

The builder is deterministic: the same corpora and seed give the same bytes (``tools/build_zero_shot_tasks.py``
writes the committed files; a test rebuilds them and compares).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prunekit.data.corpora import load_corpus

CORPORA = ("kjv", "pydocs", "fortunes", "jargon")
CONTEXT_WORDS, ENDING_WORDS = 28, 10
LASTWORD_CONTEXT_WORDS = 30
ITEMS_PER_CORPUS = 100
CHOICES = 4
TASK_FILES = {"prunekit_continuation": "continuation.jsonl", "prunekit_lastword": "lastword.jsonl"}
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
# Roles as Sphinx shows them: :func:`os.open` as "os.open", :func:`~os.open` as "open", :ref:`text <target>` as "text"
_ROLE = re.compile(r":[\w-]+(?::[\w-]+)?:`(?:~[\w.]*\.)?([^`<]*?)\s*(?:<[^`>]*>)?`")


@dataclass(frozen=True)
class Passage:
    """A cleaned paragraph of one corpus, as words."""

    corpus: str
    words: tuple[str, ...]


def clean_paragraph(text: str) -> str | None:
    """One line of prose, or None for markup, code, headings and tables (the pydocs sources are reST).

    The paragraph is stripped first, so a one-line indented paragraph counts as prose; one whose following lines
    are indented (code blocks, directive bodies) is dropped. Items need 31+ words, which one line of code is not.
    """
    lines = text.strip().splitlines()
    if not lines or any(line.startswith((" ", "\t", "..", ">>>", "=", "-", "*", "+", "|", ":")) for line in lines):
        return None
    prose = _ROLE.sub(r"\1", " ".join(lines)).replace("``", "").replace("**", "")
    if "::" in prose or "`" in prose:
        return None
    return " ".join(prose.split())


def passages(corpus: str) -> list[Passage]:
    """The evaluation split of ``corpus`` as cleaned paragraphs (records split at blank lines)."""
    found = []
    for record in load_corpus(corpus, "evaluation").records:
        for paragraph in re.split(r"\n\s*\n", record):
            prose = clean_paragraph(paragraph)
            if prose:
                found.append(Passage(corpus, tuple(prose.split(" "))))
    return found


def sentence_starts(words: tuple[str, ...]) -> list[int]:
    """Indices of words that begin a sentence (the first word, and every word after a sentence end)."""
    return [0] + [i + 1 for i, word in enumerate(words[:-1]) if _SENTENCE_END.search(word)]


def continuation_items(pool: list[Passage], rng: random.Random, count: int) -> Iterator[dict]:
    """``count`` four-way items; each passage gives at most one item, distractors come from other passages."""
    span = CONTEXT_WORDS + ENDING_WORDS
    candidates = [p for p in pool if any(start + span <= len(p.words) for start in sentence_starts(p.words))]
    rng.shuffle(candidates)
    sources = [p for p in pool if len(p.words) >= ENDING_WORDS]
    for index, passage in enumerate(candidates[:count]):
        start = rng.choice([s for s in sentence_starts(passage.words) if s + span <= len(passage.words)])
        context = passage.words[start:start + CONTEXT_WORDS]
        ending = passage.words[start + CONTEXT_WORDS:start + span]
        endings = [" ".join(ending)]
        while len(endings) < CHOICES:
            other = rng.choice(sources)
            if other is passage:
                continue
            at = rng.randrange(len(other.words) - ENDING_WORDS + 1)
            candidate = " ".join(other.words[at:at + ENDING_WORDS])
            if candidate not in endings:
                endings.append(candidate)
        gold = rng.randrange(CHOICES)
        endings[0], endings[gold] = endings[gold], endings[0]
        yield {"id": f"{passage.corpus}-{index}", "corpus": passage.corpus, "context": " ".join(context),
               "choices": endings, "label": gold}


def _last_word(word: str) -> str | None:
    """The alphabetic word that ends a sentence (punctuation and quotes stripped), if it has 3+ letters."""
    core = word.rstrip(".!?\"')]").rstrip(",;:")
    return core if len(core) >= 3 and core.isalpha() else None


def lastword_items(pool: list[Passage], rng: random.Random, count: int) -> Iterator[dict]:
    """``count`` items; each passage gives at most one: a sentence-final word and the words before it."""
    candidates = []
    for passage in pool:
        ends = [i for i in range(LASTWORD_CONTEXT_WORDS, len(passage.words))
                if _SENTENCE_END.search(passage.words[i]) and _last_word(passage.words[i])]
        if ends:
            candidates.append((passage, ends))
    rng.shuffle(candidates)
    for index, (passage, ends) in enumerate(candidates[:count]):
        end = rng.choice(ends)
        context = passage.words[end - LASTWORD_CONTEXT_WORDS:end]
        yield {"id": f"{passage.corpus}-{index}", "corpus": passage.corpus, "context": " ".join(context),
               "target": _last_word(passage.words[end])}


def build_items(seed: int = 0, items_per_corpus: int = ITEMS_PER_CORPUS) -> dict[str, list[dict]]:
    """Every task's items, by task name (deterministic in ``seed`` and the corpora)."""
    tasks: dict[str, list[list[dict]]] = {name: [] for name in TASK_FILES}
    makers = {"prunekit_continuation": continuation_items, "prunekit_lastword": lastword_items}
    for corpus in CORPORA:
        pool = passages(corpus)
        for task, make in makers.items():
            rng = random.Random(f"{seed}:{task}:{corpus}")  # string seeds are hashed stably across runs
            items = list(make(pool, rng, items_per_corpus))
            if len(items) < items_per_corpus:
                raise ValueError(f"{corpus} gives only {len(items)} {task} items, {items_per_corpus} wanted")
            tasks[task].append(items)
    # Interleaved (kjv, pydocs, fortunes, jargon, kjv, ...) so that lm-eval's --limit takes a balanced prefix.
    return {task: [item for group in zip(*per_corpus, strict=True) for item in group]
            for task, per_corpus in tasks.items()}


def write_items(directory: str | Path, seed: int = 0, items_per_corpus: int = ITEMS_PER_CORPUS) -> list[Path]:
    """Write every task's JSONL file into ``directory``; same inputs, same bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for task, items in build_items(seed, items_per_corpus).items():
        path = directory / TASK_FILES[task]
        lines = [json.dumps(item, ensure_ascii=False, sort_keys=True) for item in items]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    return written
