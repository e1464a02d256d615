"""Calibration and evaluation text: named corpora, local files, and token windows with disjoint splits."""

from prunekit.data.corpora import NAMED, CorpusText, corpus_label, load_corpus
from prunekit.data.windows import (
    BOS_MODES,
    TokenWindows,
    calibration_windows,
    evaluation_windows,
    resolve_bos,
)

calibration = calibration_windows
evaluation = evaluation_windows

__all__ = [
    "BOS_MODES",
    "NAMED",
    "CorpusText",
    "TokenWindows",
    "calibration",
    "calibration_windows",
    "corpus_label",
    "evaluation",
    "evaluation_windows",
    "load_corpus",
    "resolve_bos",
]
