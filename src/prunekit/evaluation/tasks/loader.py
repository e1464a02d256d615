"""Datasets of the offline task suite, read from the JSONL files beside this module.

The task YAMLs name these functions as ``custom_dataset``, so lm-eval loads the suite from this folder alone
(``lm_eval --include_path``, or prunekit's ``--tasks local``), with no hub access and no path to configure.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _test_split(file_name: str) -> datasets.DatasetDict:
    lines = (HERE / file_name).read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines])})


def continuation(**_metadata) -> datasets.DatasetDict:
    """The four-way continuation items (lm-eval passes the task metadata as keywords; none is used)."""
    return _test_split("continuation.jsonl")


def lastword(**_metadata) -> datasets.DatasetDict:
    """The last-word prediction items."""
    return _test_split("lastword.jsonl")
