"""The README's Python quick start runs as written (on the real SmolLM2)."""

import re
from pathlib import Path

from tests.conftest import requires_smollm2

README = Path(__file__).resolve().parents[1] / "README.md"


def _quick_start() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start in Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@requires_smollm2
def test_the_readme_quick_start_prunes_saves_reloads_and_generates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_quick_start(), "README quick start", "exec"), {})
    printed = capsys.readouterr().out
    assert "removed 20.0% of the parameters; perplexity" in printed
    assert "The Lord is my shepherd;" in printed  # the prompt, then what the pruned model generated
    assert (tmp_path / "runs" / "quickstart" / "prunekit.json").is_file()


def test_the_readme_results_section_is_generated_from_the_committed_compare_run():
    from prunekit.report.readme import END, START, results_section

    repo = README.parent
    run = repo / "benchmarks" / "results" / "compare_smollm2"
    text = README.read_text()
    committed = text[text.index(START):text.index(END) + len(END)]
    shot = repo / "docs" / "images" / "compare_report.png"
    assert shot.is_file()
    assert committed == results_section(run, repo, shot), "rerun tools/readme_results.py"
