"""Build the offline zero-shot task suite's items (committed under src/prunekit/evaluation/tasks/).

    .venv/bin/python tools/build_zero_shot_tasks.py [--seed 0] [--out DIR]

Deterministic: the same corpora (Debian's bible-kjv, python3.11-doc, fortunes, jargon-text; ``make corpora``) and
seed give the same bytes. See prunekit.data.zero_shot_tasks for what the items are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.data.zero_shot_tasks import write_items
from prunekit.evaluation.zero_shot import LOCAL_TASKS_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="item sampling seed (default: 0, the committed files)")
    parser.add_argument("--out", type=Path, default=LOCAL_TASKS_DIR, help="directory for the JSONL files")
    args = parser.parse_args()
    for path in write_items(args.out, args.seed):
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
