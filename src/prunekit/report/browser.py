"""Look at a report in a real browser: headless Chromium (Debian's ``chromium``) renders the page, dumps its DOM
after the load event, or takes a screenshot. Used by the tests and by ``tools/screenshot_report.py``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from prunekit.errors import PrunekitError

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """The first headless-capable Chromium on PATH, or None."""
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def _run(page: Path, *flags: str, timeout: int = 120) -> subprocess.CompletedProcess:
    browser = find_chromium()
    if browser is None:
        raise PrunekitError("no Chromium found (apt-get install chromium); it is needed to render the report")
    # --no-sandbox: Chromium refuses to start as root with its sandbox (CI containers run as root).
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *flags,
               Path(page).resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise PrunekitError(f"chromium failed on {page} (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    return done


def dump_dom(page: str | Path) -> str:
    """The page's DOM after its scripts ran (the report marks how many of its images decoded)."""
    return _run(Path(page), "--dump-dom").stdout


def screenshot(page: str | Path, png: str | Path, width: int = 1400, height: int = 2600) -> Path:
    """A PNG of the page's top ``height`` pixels at ``width``."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    _run(Path(page), f"--window-size={width},{height}", f"--screenshot={png}")
    if not png.is_file():
        raise PrunekitError(f"chromium wrote no screenshot of {page}")
    return png
