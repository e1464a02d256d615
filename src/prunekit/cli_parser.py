"""The ``prunekit`` command's arguments: every subcommand, option, type check and help text (no heavy imports, so
``--help`` answers at once)."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.errors import PrunekitError

# The GGUF tensor types export offers (prunekit.io.gguf_export.TENSOR_TYPES; kept here so parsing stays light).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
NO_PROGRESS_HELP = "hide progress bars (the per-step and per-layer summary lines still print)"

class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print one line naming the problem and pointing at --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise PrunekitError(f"{message} (see: {self.prog} --help)")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="smollm2-135m",
        help="bundled name (see 'prunekit models'), local HF or pruned directory, .gguf file, or hub id "
        "(default: smollm2-135m)",
    )
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: float32)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom code from a hub model")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the SHA-256 check of a pruned checkpoint's weights (for very large models)")


def _add_offload_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--offload", default="auto", choices=["auto", "none", "cpu", "disk"],
                        help="where the weights live: none (loaded whole on --device), cpu (in CPU memory, each layer "
                        "copied to --device when it runs: a GPU smaller than the model), disk (read from the model "
                        "directory's safetensors one layer at a time: a model larger than memory) or auto (whole if "
                        "the weights take at most half the available memory, else disk, said when chosen). Default: "
                        "auto")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    """A seed torch's generators accept: an integer in [-2**63, 2**64)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [-2**63, 2**64), got {value}")
    return value


def _add_task_options(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument(
        "--tasks", default=default, metavar="NAMES",
        help="zero-shot tasks through lm-eval, comma-separated: local (the offline suite: prunekit_continuation, "
        "prunekit_lastword) and/or standard names such as piqa,hellaswag where their data can be reached"
        + (f" (default: {default}; 'none' to skip)" if default else ""),
    )
    parser.add_argument("--task-limit", type=_positive_int, metavar="N",
                        help="score only the first N items of each task (quicker; larger standard errors)")
    parser.add_argument("--task-batch-size", type=_positive_int, default=16,
                        help="lm-eval batch size (default: 16)")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="prunekit",
        description="Training-free structured pruning of LLMs: prune, evaluate, benchmark, save and reload.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)

    commands.add_parser("models", help="list the bundled offline models", description="List the bundled offline "
                        "models: name, architecture, parameters, whether installed and whether converted (cached).")

    evaluate = commands.add_parser(
        "eval", help="measure perplexity and zero-shot accuracy", description="Measure perplexity on the evaluation "
        "split of corpora (windows of --seqlen tokens, one after another from the start of the split; see README "
        "'Perplexity') and, with --tasks, zero-shot accuracy through lm-eval-harness on the model in memory.",
    )
    _add_model_options(evaluate)
    evaluate.add_argument(
        "--ppl", action="append", metavar="NAME_OR_PATH",
        help="corpus: mix, sample, kjv, pydocs, fortunes, jargon, wikitext2, ptb, c4, alpaca, or a .txt/.jsonl "
        "file (whole file); repeat for several (default: mix, unless --tasks is given)",
    )
    _add_task_options(evaluate)
    evaluate.add_argument("--seqlen", type=_positive_int, default=2048, help="tokens per window (default: 2048)")
    evaluate.add_argument(
        "--max-tokens", type=_positive_int, default=65536,
        help="evaluate at most this many tokens per corpus (default: 65536)",
    )
    evaluate.add_argument("--bos", default="auto", help="auto | none | stream | window (default: auto)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=None, help="windows per forward pass")
    _add_offload_option(evaluate)
    evaluate.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON to OUT")
    evaluate.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)

    bench = commands.add_parser(
        "bench", help="measure speed and memory", description="Measure prefill and decode throughput (median "
        "and min-max of repeated runs after a warm-up), parameters, weight bytes, KV-cache bytes per token and "
        "peak memory (see prunekit.evaluation.speed for exactly what is measured).",
    )
    _add_model_options(bench)
    bench.add_argument(
        "--vs", metavar="MODEL", help="also benchmark MODEL (e.g. the dense original) and print --model / --vs ratios"
    )
    bench.add_argument("--repeats", type=_positive_int, default=5, help="timed runs per measurement (default: 5)")
    bench.add_argument(
        "--shapes", default="1x128,1x512,4x512", help="prefill BATCHxLENGTH shapes (default: 1x128,1x512,4x512)"
    )
    bench.add_argument(
        "--decode-tokens", type=int, default=64, help="greedy tokens per decode run, 0 to skip decode (default: 64)"
    )
    bench.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON to OUT")
    _add_prune_parsers(commands)
    _add_compare_parser(commands)
    _add_recover_parser(commands)
    return parser


def _add_prune_parsers(commands) -> None:
    methods = commands.add_parser("methods", help="list the pruning methods and their options",
                                  description="List every registered pruning method: what it prunes, what it needs, "
                                  "and every option with its type, default and help.")
    methods.add_argument("--all", action="store_true", help="also list internal tuning options")
    prune = commands.add_parser(
        "prune", help="prune a model and save the checkpoint",
        description="Calibrate, prune with --method to --ratio, materialise (weights really shrink), measure "
        "perplexity before and after on evaluation text disjoint from the calibration text, and save. The greedy "
        "depth searches (blockpruner, sleb) keep their finished steps in OUT.METHOD-state.json while they run; "
        "rerunning the same command resumes them, and the file is deleted once the checkpoint is saved.",
    )
    _add_model_options(prune)
    prune.add_argument("--method", required=True, help="pruning method (see 'prunekit methods')")
    prune.add_argument("--ratio", type=float,
                       help="fraction to remove, e.g. 0.2 (required, except that depth methods take --blocks instead)")
    prune.add_argument("--blocks", type=_positive_int, metavar="K",
                       help="depth methods (blockpruner, shortgpt, sleb): remove exactly K units (sub-blocks or "
                       "layers) instead of giving --ratio")
    prune.add_argument("--block-type", choices=["mix", "attn", "mlp"],
                       help="blockpruner: which sub-blocks are candidates (default: mix)")
    prune.add_argument("--ratio-of", default="all", choices=["all", "linear"],
                       help="what --ratio counts: all parameters (default) or decoder-layer linear weights")
    prune.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (must not exist)")
    prune.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    prune.add_argument("--calib", default="mix", metavar="NAME_OR_PATH",
                       help="calibration corpus or .txt/.jsonl file (default: mix, every offline corpus; a file is "
                       "used whole)")
    prune.add_argument("--calib-tokens", type=_positive_int, help="calibration tokens (default: the method's)")
    prune.add_argument("--seqlen", type=_positive_int, help="calibration window length (default: the method's)")
    prune.add_argument("--calib-windows", default="random", choices=["random", "sequential"],
                       help="seeded random windows, or consecutive windows from the start (default: random)")
    prune.add_argument("--bos", default="auto", help="auto | none | stream | window (default: auto)")
    prune.add_argument("--seed", type=_seed, default=0,
                       help="seed for calibration sampling and the method (default: 0)")
    prune.add_argument("--eval", default="mix", metavar="NAME_OR_PATH",
                       help="perplexity corpus, evaluation split (default: mix)")
    prune.add_argument("--eval-tokens", type=_positive_int, default=16384,
                       help="evaluation tokens before and after (default: 16384)")
    prune.add_argument("--eval-seqlen", type=_positive_int, help="evaluation window length (default: --seqlen)")
    prune.add_argument("--no-eval", action="store_true", help="skip the perplexity measurements")
    prune.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="set a method hyperparameter (repeatable; see 'prunekit methods')")
    _add_offload_option(prune)
    prune.add_argument("--save-dtype", help="dtype of the saved checkpoint: float32 | bfloat16 | float16 (default: "
                       "--dtype)")
    prune.add_argument("--json", type=Path, metavar="OUT", help="also write the metrics as JSON to OUT")
    prune.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)

    save = commands.add_parser(
        "save", help="apply a plan JSON to a model and save the checkpoint",
        description="Apply a pruning plan (JSON, as found under 'plan' in a checkpoint's prunekit.json) to a fresh "
        "copy of the dense model, materialise it and save a prunekit checkpoint.",
    )
    _add_model_options(save)
    save.add_argument("--plan", type=Path, required=True, help="plan JSON file")
    save.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (must not exist)")
    save.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    export = commands.add_parser(
        "export", help="export a model for serving: a plain transformers checkpoint, or GGUF for llama.cpp",
        description="--uniform: write a pruned model whose surviving layers all have the same shape as a stock "
        "Hugging Face checkpoint that transformers loads without prunekit. --gguf: write a Llama-family model "
        "(dense or pruned, any per-layer head / KV-head / FFN counts, removed attention or MLP blocks) with its "
        "tokenizer and chat template as one GGUF file that llama.cpp runs.",
    )
    _add_model_options(export)
    kind = export.add_mutually_exclusive_group(required=True)
    kind.add_argument("--uniform", action="store_true", help="a stock transformers checkpoint (needs --out)")
    kind.add_argument("--gguf", type=Path, metavar="OUT.gguf", help="a GGUF file for llama.cpp")
    export.add_argument("--out", type=Path, help="directory to write with --uniform (must not exist)")
    export.add_argument("--gguf-type", default="f16", choices=GGUF_TYPES,
                        help="tensor type of the GGUF matrices (norms stay f32; quantized types fall back to f16 for "
                        "matrices whose rows do not fit the type's block); default f16")
    export.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    export.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)


def _add_compare_parser(commands) -> None:
    compare = commands.add_parser(
        "compare", help="prune with several methods at several ratios and compare them",
        description="Run every method at every ratio on one model (each cell from a fresh copy of the dense "
        "weights, all with the same calibration windows) and record parameters, both ratios, perplexity per "
        "corpus, zero-shot accuracy, prune time, peak memory and prefill / decode speed-up against dense. "
        "Rerunning the same command computes only missing cells (a killed run loses at most the cell in "
        "progress); a failed cell records its error and the others still run. Writes results.json, results.csv, "
        "results.md, plots/ and report.html into --out.",
    )
    _add_model_options(compare)
    compare.add_argument("--methods", required=True,
                         help="comma-separated method names, or 'all' (see 'prunekit methods')")
    compare.add_argument("--ratios", default="0.1,0.2,0.3", help="comma-separated fractions to remove "
                         "(default: 0.1,0.2,0.3)")
    compare.add_argument("--ratio-of", default="all", choices=["all", "linear"],
                         help="what a ratio counts: all parameters (default) or decoder-layer linear weights")
    compare.add_argument("--out", type=Path, required=True, help="run directory (created, or resumed if it holds "
                         "a run with the same settings)")
    compare.add_argument("--calib", default="mix", metavar="NAME_OR_PATH", help="calibration corpus (default: mix)")
    compare.add_argument("--calib-tokens", type=_positive_int, default=16384,
                         help="calibration tokens shared by every cell (default: 16384)")
    compare.add_argument("--seqlen", type=_positive_int, default=512, help="calibration window (default: 512)")
    compare.add_argument("--calib-windows", default="random", choices=["random", "sequential"],
                         help="seeded random windows, or consecutive windows from the start (default: random)")
    compare.add_argument("--bos", default="auto", help="auto | none | stream | window (default: auto)")
    compare.add_argument("--seed", type=_seed, default=0, help="seed for calibration and methods (default: 0)")
    compare.add_argument("--eval", action="append", metavar="NAME_OR_PATH",
                         help="perplexity corpus, evaluation split; repeat for several (default: mix and jargon)")
    compare.add_argument("--eval-tokens", type=_positive_int, default=16384,
                         help="evaluation tokens per corpus (default: 16384)")
    compare.add_argument("--eval-seqlen", type=_positive_int, default=512, help="evaluation window (default: 512)")
    _add_task_options(compare, default="local")
    compare.add_argument("--shapes", default="1x512", help="prefill BATCHxLENGTH shapes timed (default: 1x512)")
    compare.add_argument("--decode-tokens", type=int, default=32,
                         help="greedy tokens per decode run, 0 to skip decode (default: 32)")
    compare.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per speed measurement "
                         "(default: 3)")
    compare.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                         help="set a method hyperparameter for its cells, e.g. pgprune.steps=100 (repeatable)")
    compare.add_argument("--retry-failed", action="store_true", help="rerun cells that failed before")
    compare.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)


def _add_recover_parser(commands) -> None:
    recover = commands.add_parser(
        "recover", help="LoRA recovery fine-tuning of a pruned checkpoint (peft), merged and saved",
        description="Fine-tune LoRA adapters (peft) on a pruned checkpoint with LLM-Pruner's or SlimGPT's recipe, "
        "on a local corpus (--data, its calibration split) or an instruction file (--instructions, JSONL), merge "
        "them into the weights and save a prunekit checkpoint that reloads exactly. Held-out perplexity (--eval, "
        "evaluation split) is measured before and after. The state is saved every --save-every steps in "
        "OUT.recover-state/; rerunning the same command resumes from it, and it is deleted once OUT is saved.",
    )
    _add_model_options(recover)
    recover.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (must not exist)")
    recover.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    data = recover.add_mutually_exclusive_group()
    data.add_argument("--data", default="mix", metavar="NAME_OR_PATH",
                      help="training corpus: its calibration split, or a whole .txt file (default: mix)")
    data.add_argument("--instructions", type=Path, metavar="FILE.jsonl",
                      help="instruction records (instruction/input/output, prompt/response or chat messages)")
    recover.add_argument("--train-tokens", type=_positive_int, default=262144,
                         help="with --data: tokens of training windows, cut into --seqlen windows (default: 262144)")
    recover.add_argument("--train-on-inputs", action="store_true",
                         help="with --instructions: also train on the prompt tokens, not only the answers")
    recover.add_argument("--recipe", default="llm-pruner", choices=("llm-pruner", "slimgpt"),
                         help="defaults for the options below (see 'Recovery' in the README; default llm-pruner)")
    recover.add_argument("--rank", type=_positive_int, help="LoRA rank (recipe: 8)")
    recover.add_argument("--alpha", type=float, help="LoRA alpha (recipe: 16)")
    recover.add_argument("--dropout", type=float, help="LoRA dropout (recipe: 0.05)")
    recover.add_argument("--target-modules", help="comma-separated linears to adapt (recipe: all seven)")
    recover.add_argument("--lr", type=float, help="AdamW learning rate (recipe: 1e-4)")
    recover.add_argument("--schedule", help="linear | cosine | constant (llm-pruner: linear, slimgpt: cosine)")
    recover.add_argument("--warmup-steps", type=int, help="warm-up steps (llm-pruner: 100, slimgpt: 0)")
    recover.add_argument("--batch-size", type=_positive_int, help="examples per optimizer step (recipe: 64)")
    recover.add_argument("--micro-batch-size", type=_positive_int, help="examples per forward pass (recipe: 4)")
    recover.add_argument("--epochs", type=_positive_int, help="passes over the data (llm-pruner: 2, slimgpt: 1)")
    recover.add_argument("--seqlen", type=_positive_int, help="tokens per example (recipe: 256)")
    recover.add_argument("--max-steps", type=_positive_int, help="stop after this many optimizer steps")
    recover.add_argument("--save-every", type=int, default=10, help="save the resumable state every N steps "
                         "(0: never; default: 10)")
    recover.add_argument("--eval", default="mix", metavar="NAME_OR_PATH",
                         help="held-out perplexity corpus, evaluation split (default: mix)")
    recover.add_argument("--eval-tokens", type=_positive_int, default=16384,
                         help="tokens of held-out perplexity (default: 16384)")
    recover.add_argument("--eval-seqlen", type=_positive_int, default=512, help="evaluation window (default: 512)")
    recover.add_argument("--no-eval", action="store_true", help="skip the perplexity before and after")
    recover.add_argument("--seed", type=_seed, default=0, help="seed of data order, LoRA init, dropout (default: 0)")
    recover.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON to OUT")
    recover.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
