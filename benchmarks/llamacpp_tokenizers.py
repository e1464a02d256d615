"""Does llama.cpp tokenize text as transformers does, for the tokenizers ``export --gguf`` writes?

- SmolLM2's byte-level BPE (llama.cpp pre-tokenizer ``gpt-2``), from the dense export.
- A SentencePiece-style byte-fallback BPE (the layout of Llama 2 / Mistral tokenizer.json files; none is available
  offline, so one is trained here with 4,000 tokens on the calibration splits of ``kjv`` and ``pydocs``), written
  with scores from its merge ranks; and the control with one score for every token, which is what the ``gguf``
  package's own reader of such files gives.

Texts: the first records of the evaluation splits of ``kjv``, ``pydocs`` and ``jargon``, tokenized without special
tokens by both. Writes ``benchmarks/results/llamacpp_tokenizers.json`` and ``.md``.

    .venv/bin/python benchmarks/llamacpp_tokenizers.py
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

from _shared import RESULTS, write_results
from llamacpp_smollm2 import CACHE, ensure_llama_cpp, tiny_model

import prunekit
import prunekit.io.gguf_vocab as gguf_vocab
from prunekit.data.corpora import load_corpus
from prunekit.evaluation.machine import machine_info
from prunekit.io.gguf_export import export_gguf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.io.test_gguf_export import sentencepiece_style  # noqa: E402  (the unit test's tokenizer recipe)


def agreement(llama_cpp, tokenizer, path: Path, texts: list[str]) -> dict:
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    same = sum(tokenizer(text, add_special_tokens=False).input_ids
               == llm.tokenize(text.encode(), add_bos=False, special=False) for text in texts)
    tokens = sum(len(tokenizer(text, add_special_tokens=False).input_ids) for text in texts)
    return {"texts": len(texts), "identical": same, "tokens": tokens}


def main() -> None:
    llama_cpp = ensure_llama_cpp()
    sources = {name: load_corpus(name, "evaluation").records[:count]
               for name, count in (("kjv", 300), ("pydocs", 100), ("jargon", 100))}
    texts = [record for records in sources.values() for record in records]
    rows = []
    dense, smol = prunekit.load_model("smollm2-135m")
    path = CACHE / "gguf" / "tokenizer-smollm2.gguf"
    export_gguf(dense, smol, path, "q8_0", overwrite=True)
    rows.append({"tokenizer": "SmolLM2 (byte-level BPE, pre-tokenizer gpt-2)",
                 **agreement(llama_cpp, smol, path, texts)})
    training = load_corpus("kjv", "calibration").records[:3000] + load_corpus("pydocs", "calibration").records[:300]
    spm = sentencepiece_style(4000, training)
    model = tiny_model("llama", 0, vocab_size=len(spm))
    path = CACHE / "gguf" / "tokenizer-spm.gguf"
    export_gguf(model, spm, path, "f32", overwrite=True)
    rows.append({"tokenizer": "SentencePiece-style BPE, scores from merge ranks",
                 **agreement(llama_cpp, spm, path, texts)})
    original = gguf_vocab.merge_scores
    gguf_vocab.merge_scores = lambda model, tokens: [-1000.0] * len(tokens)
    try:
        export_gguf(model, spm, path, "f32", overwrite=True)
    finally:
        gguf_vocab.merge_scores = original
    rows.append({"tokenizer": "control: the same with one score for every token",
                 **agreement(llama_cpp, spm, path, texts)})
    payload = {"benchmark": "llamacpp_tokenizers", "date": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": machine_info(), "llama_cpp_python": llama_cpp.__version__, "rows": rows}
    lines = ["# llama.cpp tokenizes like transformers\n",
             f"{payload['date']}, llama-cpp-python {payload['llama_cpp_python']}; texts: the first records of the "
             "evaluation splits of " + ", ".join(f"{name} ({len(records)})" for name, records in sources.items())
             + ", without special tokens.\n",
             "| tokenizer | texts tokenized identically | tokens (transformers) |", "|---|---:|---:|"]
    lines += [f"| {row['tokenizer']} | {row['identical']} / {row['texts']} | {row['tokens']:,} |" for row in rows]
    write_results(RESULTS / "llamacpp_tokenizers", payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
