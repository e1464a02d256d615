"""Does llama.cpp really run prunekit's GGUF exports? SmolLM2-135M dense, SlimGPT 20% and BlockPruner 20%.

1. Builds llama.cpp's Python binding (llama-cpp-python, pinned) from its PyPI source package into a wheel cached in
   ``~/.cache/prunekit/llama-cpp/`` (about 8 minutes on 2 cores, once) and installs it into the running venv.
2. Prunes: SlimGPT 20% with ``prunekit prune`` (the compare run's settings: 2,048 calibration tokens of ``mix`` in
   256-token windows, seed 0); BlockPruner 20% is the plan of the committed compare run
   (``results/compare_smollm2/cells/blockpruner@0.2.json``: its removed blocks, applied to the dense model).
3. Checks first, in f32, random 5-layer models with every kind of removal (Llama, Llama 3 RoPE scaling, Mistral,
   Qwen2 with q/k/v biases) and a control without the zero MLP stand-in (see ``prunekit.io.gguf_export``).
4. Exports each with ``prunekit export --gguf`` as f32, f16 and q8_0, and compares llama.cpp with transformers on the
   same token ids (4 windows of 256 tokens from the ``mix`` evaluation split; for the f32 file with an f32 KV cache,
   llama.cpp's default f16 cache otherwise): the largest difference of any
   log-probability over the whole vocabulary, the mean difference of the next token's log-probability, top-1
   agreement and both perplexities; a 32-token greedy generation from the same prompt on both; llama.cpp's own
   prompt-processing (512 tokens in one batch) and generation (single-token decode) speed from its perf counters,
   median of 3, 2 threads.

Writes ``benchmarks/results/llamacpp_smollm2.json`` and ``.md`` with the machine and date.

    .venv/bin/python benchmarks/llamacpp_smollm2.py
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from _shared import compare_run_model, write_results

import prunekit
from prunekit.data.windows import evaluation_windows
from prunekit.evaluation.machine import machine_info
from prunekit.structure import PruningPlan

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit")) / "llama-cpp"
LLAMA_CPP_VERSION = "0.3.36"
PROMPT = "In the beginning God created the heaven and the earth. And the earth was"
TYPES = ("f32", "f16", "q8_0")
THREADS = 2
# Not -march=native: on this VM the CPU reports AMX, whose tiles the kernel does not grant, and a native build's
# batched Q8_0 matrix products die with SIGILL. AVX2 / AVX-512 / FMA / F16C are what the comparison needs.
BUILD_FLAGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON "
               "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF")


def ensure_llama_cpp():
    """Import llama_cpp at the pinned version, building and caching its wheel from the PyPI sdist when needed."""
    build = hashlib.sha256(f"{LLAMA_CPP_VERSION} {BUILD_FLAGS}".encode()).hexdigest()[:12]
    marker = CACHE / f"installed-{hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]}.txt"
    if marker.is_file() and marker.read_text().strip() == build:
        return importlib.import_module("llama_cpp")
    wheels = CACHE / "wheels" / build
    wheel = next(iter(sorted(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl"))), None)
    if wheel is None:
        print(f"building llama-cpp-python {LLAMA_CPP_VERSION} from source (several minutes, once)...", flush=True)
        with tempfile.TemporaryDirectory() as folder:
            pip = [sys.executable, "-m", "pip"]
            subprocess.run([*pip, "download", "--no-deps", "--no-binary", ":all:", "-d", folder,
                            f"llama-cpp-python=={LLAMA_CPP_VERSION}"], check=True)
            sdist = next(Path(folder).glob("llama_cpp_python-*.tar.gz"))
            env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2), "CMAKE_ARGS": BUILD_FLAGS}
            subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(sdist)], check=True, env=env)
        wheel = next(iter(sorted(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl"))))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", str(wheel)],
                   check=True)
    marker.write_text(build + "\n")
    importlib.invalidate_caches()
    return importlib.import_module("llama_cpp")


def slimgpt_checkpoint() -> Path:
    out = CACHE / "checkpoints" / "slimgpt-20"
    if not out.exists():
        subprocess.run([sys.executable, "-m", "prunekit.cli", "prune", "--model", "smollm2-135m", "--method",
                        "slimgpt", "--ratio", "0.2", "--calib", "mix", "--calib-tokens", "2048", "--seqlen", "256",
                        "--no-eval", "--no-progress", "--out", str(out)], check=True)
    return out


def export(model, tokenizer, name: str, kind: str) -> Path:
    from prunekit.io.gguf_export import export_gguf

    path = CACHE / "gguf" / f"{name}-{kind}.gguf"
    export_gguf(model, tokenizer, path, kind, overwrite=True)
    return path


@torch.no_grad()
def reference_log_probs(model, windows: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(windows).logits.float(), -1)


def llama_log_probs(llama_cpp, path: Path, windows: torch.Tensor, cache: str) -> torch.Tensor:
    """llama.cpp's log-probabilities; ``cache`` f32 keeps the KV cache in f32 (llama.cpp's default is f16)."""
    cache_type = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[cache]
    llm = llama_cpp.Llama(str(path), n_ctx=windows.shape[1], n_batch=windows.shape[1], logits_all=True,
                          n_threads=THREADS, type_k=cache_type, type_v=cache_type, verbose=False)
    rows = []
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        rows.append(torch.from_numpy(np.array(llm.scores[: len(window)], dtype=np.float32)))
    llm.close()
    return torch.log_softmax(torch.stack(rows), -1)


def agreement(reference: torch.Tensor, other: torch.Tensor, windows: torch.Tensor) -> dict:
    targets = windows[:, 1:].unsqueeze(-1)
    ref_next = reference[:, :-1].gather(-1, targets).squeeze(-1)
    other_next = other[:, :-1].gather(-1, targets).squeeze(-1)
    return {
        "max_abs_logprob_diff": float((reference - other).abs().max()),
        "mean_abs_next_token_logprob_diff": float((ref_next - other_next).abs().mean()),
        "top1_agreement": float((reference.argmax(-1) == other.argmax(-1)).float().mean()),
        "ppl_transformers": float(torch.exp(-ref_next.mean())),
        "ppl_llama_cpp": float(torch.exp(-other_next.mean())),
    }


@torch.no_grad()
def greedy(model, tokenizer, llama_cpp, path: Path, new_tokens: int = 32) -> dict:
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    hf = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                        pad_token_id=tokenizer.eos_token_id)[0, prompt.shape[1]:].tolist()
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=THREADS, verbose=False)
    produced = []
    for token in llm.generate(prompt[0].tolist(), temp=0.0, top_k=1):
        produced.append(token)
        if len(produced) == new_tokens:
            break
    llm.close()
    same = next((index for index, (a, b) in enumerate(zip(hf, produced, strict=True)) if a != b), new_tokens)
    return {"prompt": PROMPT, "transformers": tokenizer.decode(hf), "llama_cpp": tokenizer.decode(produced),
            "identical_prefix_tokens": same, "new_tokens": new_tokens}


def llama_speed(llama_cpp, path: Path, stream: list[int], prompt_tokens: int = 512, decode_tokens: int = 64,
                repeats: int = 3) -> dict:
    llm = llama_cpp.Llama(str(path), n_ctx=prompt_tokens + decode_tokens, n_batch=prompt_tokens,
                          n_ubatch=prompt_tokens, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    prefill, decode = [], []
    for _ in range(repeats):
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        # llama.cpp adds a decode to its counters when the context synchronises; the binding's eval does not.
        llm.eval(stream[:prompt_tokens])
        llama_cpp.llama_synchronize(llm.ctx)
        for token in stream[prompt_tokens: prompt_tokens + decode_tokens]:
            llm.eval([token])  # single-token decodes: the work of generation, without the sampler
            llama_cpp.llama_synchronize(llm.ctx)
        perf = llama_cpp.llama_perf_context(llm.ctx)
        prefill.append(perf.n_p_eval / perf.t_p_eval_ms * 1000)
        decode.append(perf.n_eval / perf.t_eval_ms * 1000)
    llm.close()
    return {"prompt_tokens_per_second": statistics.median(prefill),
            "decode_tokens_per_second": statistics.median(decode)}


def tiny_model(family: str, seed: int, **overrides):
    """A 5-layer random model of ``family`` (hidden 64, 4 heads / 2 KV heads of 16, FFN 96) over SmolLM2's vocab;
    weights drawn wider than usual (std 0.25) so its next-token distributions are far from uniform."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                    tie_word_embeddings=False, initializer_range=0.25)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **settings))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))  # norms and biases away from their constants
    return model.eval()


def every_removal(model):
    """Layer 0 without attention, layer 1 with half its KV groups and no MLP, layer 2 removed, layer 3 with one
    query head per group and 50 channels, layer 4 with 56 channels."""
    plan = PruningPlan.keep_all(prunekit.adapter_for(model), method="manual")
    plan.remove_attention(0)
    plan.keep_channels(0, range(0, 96, 2))
    plan.keep_kv_groups(1, [1])
    plan.remove_mlp(1)
    plan.remove_layer(2)
    plan.keep_heads(3, [1, 3])
    plan.keep_channels(3, [5, *range(30, 79)])
    plan.keep_channels(4, range(40, 96))
    return prunekit.apply_plan(model, plan)


def tiny_checks(llama_cpp, tokenizer, windows: torch.Tensor) -> list[dict]:
    """f32 agreement on random models with every kind of removal, per family and RoPE variant, and the control that
    shows why the zero MLP stand-in is needed."""
    import prunekit.io.gguf_export as gguf_export

    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cases = [("llama dense", "llama", {}, False), ("llama, every removal", "llama", {}, True),
             ("llama 3 RoPE scaling, every removal", "llama", {"rope_parameters": llama3}, True),
             ("mistral, every removal", "mistral", {}, True),
             ("qwen2 (q/k/v biases), every removal", "qwen2", {}, True)]
    rows, short = [], windows[:2, :128]
    for index, (name, family, overrides, pruned) in enumerate(cases):
        model = tiny_model(family, index, **overrides)
        model = every_removal(model) if pruned else model
        path = export(model, tokenizer, f"tiny-{index}", "f32")
        rows.append({"case": name, **agreement(reference_log_probs(model, short),
                                               llama_log_probs(llama_cpp, path, short, "f32"), short)})
    original = gguf_export.StandIns
    gguf_export.StandIns = lambda mlps, attention: original([], attention)  # the control: FFN length 0 as is
    try:
        model = every_removal(tiny_model("llama", 1))
        path = export(model, tokenizer, "tiny-control", "f32")
        rows.append({"case": "control: MLP-less layer written with FFN length 0 (no stand-in)",
                     **agreement(reference_log_probs(model, short), llama_log_probs(llama_cpp, path, short, "f32"),
                                 short)})
    finally:
        gguf_export.StandIns = original
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "llamacpp_smollm2")
    args = parser.parse_args()
    started = time.time()
    llama_cpp = ensure_llama_cpp()
    torch.manual_seed(0)
    dense, tokenizer = prunekit.load_model("smollm2-135m")
    slim, _ = prunekit.load_pruned(slimgpt_checkpoint())
    block, _ = compare_run_model("blockpruner", 0.2)
    windows = evaluation_windows(tokenizer, "mix", seqlen=256, max_tokens=1024).input_ids
    stream = evaluation_windows(tokenizer, "kjv", seqlen=576, max_tokens=576).input_ids[0].tolist()
    tiny = tiny_checks(llama_cpp, tokenizer, windows)
    for row in tiny:
        print(json.dumps(row), flush=True)
    rows = []
    for name, model in (("dense", dense), ("slimgpt-20", slim), ("blockpruner-20", block)):
        reference = reference_log_probs(model, windows)
        parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        for kind in TYPES:
            path = export(model, tokenizer, name, kind)
            cache = "f32" if kind == "f32" else "f16"
            row = {"model": name, "type": kind, "kv_cache": cache, "parameters": parameters,
                   "gguf_bytes": path.stat().st_size,
                   **agreement(reference, llama_log_probs(llama_cpp, path, windows, cache), windows),
                   **llama_speed(llama_cpp, path, stream)}
            if kind == "f32":
                row["generation"] = greedy(model, tokenizer, llama_cpp, path)
            rows.append(row)
            print(json.dumps({key: value for key, value in row.items() if key != "generation"}), flush=True)
    payload = {"benchmark": "llamacpp_smollm2", "date": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": machine_info(), "llama_cpp_python": llama_cpp.__version__, "threads": THREADS,
               "windows": list(windows.shape), "seconds": round(time.time() - started, 1), "tiny_models": tiny,
               "rows": rows}
    write_results(args.out, payload, markdown(payload))


def markdown(payload: dict) -> str:
    machine = payload["machine"]
    lines = ["# llama.cpp runs prunekit's GGUF exports (SmolLM2-135M)\n",
             f"{payload['date']}, {machine.get('cpu_model', '')}, {machine.get('cpu_count')} CPUs, llama-cpp-python "
             f"{payload['llama_cpp_python']}, {payload['threads']} threads; log-probabilities on "
             f"{payload['windows'][0]} x {payload['windows'][1]} tokens of `mix` (evaluation split).\n",
             "Log-probabilities: f32 files with an f32 KV cache, others with llama.cpp's default f16 cache; speed "
             "always with the default f16 cache.\n",
             "| model | type | GGUF MiB | max abs d log-p | mean abs d log-p (next token) | top-1 agree | ppl HF | "
             "ppl llama.cpp | prompt tok/s | decode tok/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in payload["rows"]:
        lines.append(f"| {row['model']} | {row['type']} | {row['gguf_bytes'] / 2**20:.1f} | "
                     f"{row['max_abs_logprob_diff']:.2e} | {row['mean_abs_next_token_logprob_diff']:.2e} | "
                     f"{row['top1_agreement']:.4f} | {row['ppl_transformers']:.2f} | {row['ppl_llama_cpp']:.2f} | "
                     f"{row['prompt_tokens_per_second']:.0f} | {row['decode_tokens_per_second']:.1f} |")
    lines.append("\nRandom 5-layer models (hidden 64, SmolLM2's vocabulary), f32 file and KV cache, 2 x 128 tokens:\n")
    lines.append("| case | max abs d log-p | top-1 agree |")
    lines.append("|---|---:|---:|")
    for row in payload["tiny_models"]:
        lines.append(f"| {row['case']} | {row['max_abs_logprob_diff']:.2e} | {row['top1_agreement']:.4f} |")
    lines.append("\nGreedy generation (f32, 32 new tokens):\n")
    for row in payload["rows"]:
        if "generation" in row:
            generation = row["generation"]
            lines.append(f"- **{row['model']}**: identical for {generation['identical_prefix_tokens']} of "
                         f"{generation['new_tokens']} tokens. transformers: `{generation['transformers']!r}`; "
                         f"llama.cpp: `{generation['llama_cpp']!r}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
