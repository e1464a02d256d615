"""Regenerate the bundled public-domain sample from Debian's bible-kjv (run once; the output is committed).

    python tools/build_sample.py
"""

from pathlib import Path

from prunekit.data.corpora import SAMPLE_BOOKS, kjv_books

TARGET = Path(__file__).resolve().parents[1] / "src" / "prunekit" / "data" / "corpora" / "sample.txt"


def main() -> None:
    books = kjv_books()
    chapters = [chapter for book in SAMPLE_BOOKS for chapter in books[book]]
    TARGET.write_text("\n\n".join(chapters) + "\n", encoding="utf-8")
    print(f"wrote {TARGET} ({TARGET.stat().st_size} bytes, {len(chapters)} chapters)")


if __name__ == "__main__":
    main()
