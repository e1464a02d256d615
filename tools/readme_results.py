"""Regenerate the README's results section from a committed compare run (and optionally screenshot its report).

    .venv/bin/python tools/readme_results.py [--run benchmarks/results/compare_smollm2] [--screenshot]

--screenshot renders the run's report.html in headless Chromium into docs/images/compare_report.png first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.report.browser import screenshot
from prunekit.report.readme import replace_section, results_section

REPO = Path(__file__).resolve().parents[1]
SHOT = REPO / "docs" / "images" / "compare_report.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=REPO / "benchmarks" / "results" / "compare_smollm2")
    parser.add_argument("--screenshot", action="store_true", help="retake docs/images/compare_report.png")
    args = parser.parse_args()
    if args.screenshot:
        screenshot(args.run / "report.html", SHOT)
        print(f"wrote {SHOT}")
    readme = REPO / "README.md"
    section = results_section(args.run, REPO, SHOT if SHOT.is_file() else None)
    readme.write_text(replace_section(readme.read_text(), section))
    print(f"updated the results section of {readme}")


if __name__ == "__main__":
    main()
