"""Where prunekit's summary lines (one per search step or pruned layer) go when a person is watching.

The methods log those lines to the ``prunekit`` logger at INFO level instead of printing them, so a library user
decides whether to see them, and ``--no-progress`` can hide the progress bars without hiding the summaries.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from tqdm.contrib.logging import logging_redirect_tqdm

LOGGER_NAME = "prunekit"


@contextlib.contextmanager
def console_summaries() -> Iterator[None]:
    """Show prunekit's INFO lines on stderr while the block runs, written between (not through) progress bars."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous_level, previous_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a root handler the caller set up would print every line twice
    try:
        with logging_redirect_tqdm(loggers=[logger]):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        logger.propagate = previous_propagate
