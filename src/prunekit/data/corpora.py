"""Named text corpora and local files, each with a calibration split and an evaluation split that share no text.

A corpus is a list of records (documents, chapters, paragraphs). Each corpus fixes, by construction, which records
belong to calibration and which to evaluation:

- ``sample``: public-domain KJV wisdom books bundled in the package (Job, Psalms, Proverbs, Ecclesiastes, Song of
  Solomon), one record per chapter; the last quarter of the text (by characters) is evaluation.
- ``kjv``: Debian's ``bible-kjv`` without the books bundled as ``sample`` (so the two never share text); the Old
  Testament is calibration, the New Testament evaluation.
- ``pydocs``: Debian's ``python3.11-doc`` reST sources, one record per file in sorted order; the library reference
  (``library/``) is evaluation, everything else (tutorial, howto, faq, reference, c-api, ...) calibration.
- ``fortunes``: Debian's ``fortunes`` (modern English: quotations, jokes, fables, short prose), one record per
  cookie, files in sorted order (``ascii-art`` and ``art`` left out); the last quarter is evaluation.
- ``jargon``: Debian's ``jargon-text`` (the Jargon File, a lexicon of hacker slang), one record per paragraph; the
  last quarter is evaluation. It is in no calibration mix: its evaluation split measures how a pruned model does on
  a kind of text it was not calibrated on.
- ``mix`` (the default): the calibration and evaluation splits of ``sample``, ``kjv``, ``pydocs`` and ``fortunes``
  together, each kind of text an equal share of the tokens (scripture: ``sample`` and ``kjv`` a sixth each;
  technical reference: ``pydocs`` a third; modern prose: ``fortunes`` a third). Token windows are drawn from every
  member separately (``data.windows``), so no window spans two corpora; as records, the members' are concatenated.
- a local ``.txt`` file (records = paragraphs separated by blank lines) or ``.jsonl`` file (records = the ``text``
  field): the last quarter by characters is evaluation. ``split="all"`` gives the whole file (a ``.txt`` file
  verbatim, as one record).
- ``wikitext2``, ``ptb``, ``c4``, ``alpaca``: Hugging Face datasets, their published train / test splits (alpaca:
  a fixed 10% test split, seed 42), only where the network or a local datasets cache allows.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from prunekit.errors import PrunekitError

SPLITS = ("calibration", "evaluation", "all")
EVALUATION_FRACTION = 0.25
SAMPLE_BOOKS = ("Job", "Psa", "Prv", "Eccl", "SSol")
KJV_EVALUATION_FIRST_BOOK = "Mat"
PYDOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
FORTUNES_ROOT = Path("/usr/share/games/fortunes")
FORTUNES_LEFT_OUT = ("art", "ascii-art")  # pictures, not prose
JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
# Members of the default mix and their share weights (equal shares per kind of text; module docstring).
MIX = {"sample": 1, "kjv": 1, "pydocs": 2, "fortunes": 2}
HF_DATASETS = ("wikitext2", "ptb", "c4", "alpaca")
NAMED = ("mix", "sample", "kjv", "pydocs", "fortunes", "jargon", *HF_DATASETS)


@dataclass
class CorpusText:
    """The records of one split of one corpus."""

    name: str
    split: str
    records: list[str]
    description: str

    @property
    def text(self) -> str:
        """Records joined with a blank line (the WikiText convention of the perplexity protocol)."""
        return "\n\n".join(self.records)


def load_corpus(source: str | Path, split: str = "evaluation") -> CorpusText:
    """Records of ``split`` of a named corpus or a local ``.txt`` / ``.jsonl`` file."""
    if split not in SPLITS:
        raise PrunekitError(f"unknown split '{split}'; use one of: {', '.join(SPLITS)}")
    name = str(source)
    if name == "sample":
        return _tail_split("sample", _paragraphs(_sample_text()), split, "bundled KJV wisdom books")
    if name == "kjv":
        return _kjv(split)
    if name == "pydocs":
        return _pydocs(split)
    if name == "fortunes":
        return _tail_split("fortunes", _fortune_records(), split, "Debian fortunes cookies")
    if name == "jargon":
        return _tail_split("jargon", _jargon_records(), split, "Debian jargon-text (the Jargon File)")
    if name == "mix":
        records = [record for member in MIX for record in load_corpus(member, split).records]
        return CorpusText("mix", split, records, f"mix of {', '.join(MIX)}, {split} split")
    if name in HF_DATASETS:
        return _hf_dataset(name, split)
    check_source(name)
    path = Path(name).expanduser()
    if split == "all" and path.suffix != ".jsonl":
        # The whole file, verbatim: a calibration text given by a user (e.g. a paper's golden case) must tokenise
        # to exactly the ids it gives on its own, not to its paragraphs re-joined.
        return CorpusText(path.name, split, [_read_text(path)], f"local file {path}")
    return _tail_split(path.name, _file_records(path), split, f"local file {path}")


def check_source(source: str | Path) -> None:
    """Fail fast, before a model is loaded, on a corpus name that is neither known nor an existing file."""
    name = str(source)
    if name not in NAMED and not Path(name).expanduser().is_file():
        raise PrunekitError(
            f"unknown corpus '{name}': not a file and not one of {', '.join(NAMED)}; pass a .txt or .jsonl path"
        )


def corpus_label(source: str | Path) -> str:
    """The name results are reported under: the corpus name, or the file name for a path."""
    name = str(source)
    return name if name in NAMED else Path(name).name


def _tail_split(name: str, records: list[str], split: str, description: str) -> CorpusText:
    """Evaluation = the shortest tail of records holding at least EVALUATION_FRACTION of the characters."""
    if split == "all":
        return CorpusText(name, split, records, description)
    total = sum(len(record) for record in records)
    boundary, tail = len(records), 0
    while boundary > 1 and tail < EVALUATION_FRACTION * total:
        boundary -= 1
        tail += len(records[boundary])
    chosen = records[:boundary] if split == "calibration" else records[boundary:]
    label = f"{description}, {split} split (last {EVALUATION_FRACTION:.0%} is evaluation)"
    return CorpusText(name, split, chosen, label)


def _paragraphs(text: str) -> list[str]:
    return [part.strip() for part in re.split(r"\n\s*\n", text) if part.strip()]


def _sample_text() -> str:
    return resources.files("prunekit.data").joinpath("corpora/sample.txt").read_text(encoding="utf-8")


def _read_text(path: Path) -> str:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PrunekitError(f"{path} is not UTF-8 text; pass a .txt or .jsonl file") from None
    if not raw.strip():
        raise PrunekitError(f"{path} contains no text")
    return raw


def _file_records(path: Path) -> list[str]:
    raw = _read_text(path)
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise PrunekitError(f"{path} line {number} is not a JSON object with a 'text' field") from None
    else:
        records = _paragraphs(raw)
    if not records:
        raise PrunekitError(f"{path} contains no text")
    return records


# -- Debian corpora ------------------------------------------------------------------------------------------

def kjv_books() -> dict[str, list[str]]:
    """The KJV from Debian's ``bible`` program: book abbreviation -> chapters (verses joined by spaces)."""
    if shutil.which("bible") is None:
        raise PrunekitError("corpus 'kjv' needs Debian's bible-kjv; run: apt-get install bible-kjv (or make corpora)")
    listing = subprocess.run(
        ["bible", "-f", "Ge1:1-Re22:21"], capture_output=True, text=True, check=True
    ).stdout
    books: dict[str, dict[int, list[str]]] = {}
    for line in listing.splitlines():
        match = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
        if match:
            book, chapter, _, verse = match.groups()
            books.setdefault(book, {}).setdefault(int(chapter), []).append(verse.strip())
    return {book: [" ".join(verses) for _, verses in sorted(chapters.items())] for book, chapters in books.items()}


def _kjv(split: str) -> CorpusText:
    books = kjv_books()
    order = [book for book in books if book not in SAMPLE_BOOKS]
    first_nt = order.index(KJV_EVALUATION_FIRST_BOOK)
    chosen = {"calibration": order[:first_nt], "evaluation": order[first_nt:], "all": order}[split]
    records = [chapter for book in chosen for chapter in books[book]]
    return CorpusText("kjv", split, records, f"Debian bible-kjv without the sample books, {split} split")


def _pydocs(split: str) -> CorpusText:
    if not PYDOCS_ROOT.is_dir():
        raise PrunekitError(
            f"corpus 'pydocs' needs Debian's python3.11-doc ({PYDOCS_ROOT} is missing); "
            "run: apt-get install python3.11-doc (or make corpora)"
        )
    files = sorted(PYDOCS_ROOT.rglob("*.rst.txt"))
    relative = [path.relative_to(PYDOCS_ROOT).as_posix() for path in files]
    keep = {
        "calibration": lambda name: not name.startswith("library/"),
        "evaluation": lambda name: name.startswith("library/"),
        "all": lambda name: True,
    }[split]
    records = [
        path.read_text(encoding="utf-8").strip() for path, name in zip(files, relative, strict=True) if keep(name)
    ]
    return CorpusText("pydocs", split, records, f"Debian python3.11-doc reST sources, {split} split")


def _fortune_records() -> list[str]:
    if not FORTUNES_ROOT.is_dir():
        raise PrunekitError(f"corpus 'fortunes' needs Debian's fortunes ({FORTUNES_ROOT} is missing); "
                            "run: apt-get install fortunes (or make corpora)")
    records = []
    for path in sorted(FORTUNES_ROOT.iterdir()):
        if path.suffix or path.name in FORTUNES_LEFT_OUT or not path.is_file():
            continue  # .dat index files, and symlinks to the offensive set when it is installed
        text = path.read_text(encoding="utf-8", errors="replace")
        records += [cookie.strip("\n").rstrip() for cookie in re.split(r"^%$", text, flags=re.M) if cookie.strip()]
    return list(dict.fromkeys(records))  # a cookie kept in two files must not land in both splits


def _jargon_records() -> list[str]:
    if not JARGON_FILE.is_file():
        raise PrunekitError(f"corpus 'jargon' needs Debian's jargon-text ({JARGON_FILE} is missing); "
                            "run: apt-get install jargon-text (or make corpora)")
    with gzip.open(JARGON_FILE, "rt", encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    # The file is hard-wrapped and indented: a paragraph's lines are joined into one line of prose.
    paragraphs = [" ".join(line.strip() for line in paragraph.splitlines()) for paragraph in _paragraphs(text)]
    return list(dict.fromkeys(paragraphs))  # repeated short paragraphs ("See {foo}.") must not cross splits


# -- Hugging Face datasets (network or local cache only) ------------------------------------------------------

_HF_SPECS = {
    # name: (path, config, calibration split, evaluation split, text field)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "test", "sentence"),
    "c4": ("allenai/c4", "en", "train", "validation", "text"),
    "alpaca": ("tatsu-lab/alpaca", None, "train", "train", "text"),
}
_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


def _hf_dataset(name: str, split: str) -> CorpusText:
    try:
        import datasets
    except ImportError:
        raise PrunekitError(
            f"corpus '{name}' needs the 'datasets' package: pip install 'prunekit[datasets]'; "
            "or pass a local .txt or .jsonl copy of the text"
        ) from None
    path, config, calibration_split, evaluation_split, field = _HF_SPECS[name]
    wanted = [calibration_split, evaluation_split] if split == "all" else (
        [calibration_split] if split == "calibration" else [evaluation_split]
    )
    records: list[str] = []
    try:
        for hf_split in dict.fromkeys(wanted):
            kwargs = {"data_files": {hf_split: _C4_FILES[hf_split]}} if name == "c4" else {}
            data = datasets.load_dataset(path, config, split=hf_split, **kwargs)
            if name == "alpaca":
                parts = data.train_test_split(test_size=0.1, seed=42)
                data = parts["train" if split == "calibration" else "test"]
            records.extend(str(row) for row in data[field])
    except Exception as error:  # datasets raises many types for "no network and no cache"
        raise PrunekitError(
            f"cannot load dataset '{name}' ({type(error).__name__}); it needs the network or a local datasets cache; "
            "offline, pass a local .txt or .jsonl copy of the text instead"
        ) from None
    return CorpusText(name, split, records, f"Hugging Face dataset {path}, {split} split")
