"""The ``prunekit`` command. Thin: parses arguments, calls the Python API, prints results.

Every user mistake ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from prunekit.errors import PrunekitError


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="prunekit",
        description="Training-free structured pruning of LLMs: prune, evaluate, benchmark, save and reload.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)

    commands.add_parser("models", help="list the bundled offline models", description="List the bundled offline "
                        "models: name, architecture, parameters, whether installed and whether converted (cached).")

    evaluate = commands.add_parser(
        "eval", help="measure perplexity", description="Measure perplexity on the evaluation split of corpora "
        "(windows of --seqlen tokens, one after another from the start of the split; see README 'Perplexity').",
    )
    _add_model_options(evaluate)
    evaluate.add_argument(
        "--ppl", action="append", metavar="NAME_OR_PATH",
        help="corpus: sample, kjv, pydocs, wikitext2, ptb, c4, alpaca, or a .txt/.jsonl file (whole file); "
        "repeat for several (default: sample)",
    )
    evaluate.add_argument("--seqlen", type=_positive_int, default=2048, help="tokens per window (default: 2048)")
    evaluate.add_argument(
        "--max-tokens", type=_positive_int, default=65536,
        help="evaluate at most this many tokens per corpus (default: 65536)",
    )
    evaluate.add_argument("--bos", default="auto", help="auto | none | stream | window (default: auto)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=None, help="windows per forward pass")
    evaluate.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON to OUT")
    evaluate.add_argument("--no-progress", action="store_true", help="hide progress bars")

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 0
        return {"models": _cmd_models, "eval": _cmd_eval, "bench": _cmd_bench}[args.command](args)
    except PrunekitError as error:
        print(f"prunekit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunekit: interrupted", file=sys.stderr)
        return 130


def _cmd_models(args: argparse.Namespace) -> int:
    from prunekit.models.bundled import BUNDLED, is_cached, is_installed
    from prunekit.report import format_table

    rows = [
        [m.name, m.architecture, m.parameters, "yes" if is_installed(m) else f"no ({m.install_command()})",
         "yes" if is_cached(m) else "no", m.description]
        for m in BUNDLED.values()
    ]
    print(format_table(["name", "architecture", "parameters", "installed", "cached", "description"], rows))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import prunekit
    from prunekit.data.corpora import check_source
    from prunekit.data.windows import evaluation_windows, resolve_bos
    from prunekit.models.adapters import unique_parameter_count
    from prunekit.report import format_table

    sources = args.ppl or ["sample"]
    for source in sources:
        check_source(source)
    if args.json is not None and args.json.is_dir():
        raise PrunekitError(f"--json {args.json} is a directory; give a file path")
    model, tokenizer = prunekit.load_model(args.model, args.dtype, args.device, args.trust_remote_code)
    resolve_bos(tokenizer, args.bos)
    seqlen = _cap_seqlen(model, args.seqlen)
    results = {}
    for source in sources:
        split = "all" if Path(source).is_file() else "evaluation"
        windows = evaluation_windows(tokenizer, source, seqlen, args.max_tokens, args.bos, split=split)
        results[windows.source] = prunekit.perplexity(model, windows, args.batch_size, not args.no_progress)
    params = unique_parameter_count(model)
    rows = [[name, r.perplexity, r.windows, r.scored_tokens, r.seqlen, r.bos, r.dtype, f"{r.seconds:.1f}"]
            for name, r in results.items()]
    print(f"model: {args.model}  parameters: {params:,}")
    print(format_table(["corpus", "perplexity", "windows", "scored tokens", "seqlen", "bos", "dtype", "seconds"], rows))
    if args.json is not None:
        report = {
            "model": str(args.model),
            "params": params,
            "dtype": results[next(iter(results))].dtype,
            "perplexity": {name: r.perplexity for name, r in results.items()},
            "details": {name: r.to_dict() for name, r in results.items()},
        }
        _write_json(args.json, report)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import gc

    import prunekit
    from prunekit.evaluation.speed import benchmark_speed, compare_speed, parse_shapes, speed_table
    from prunekit.report import format_table

    shapes = parse_shapes(args.shapes)
    if args.decode_tokens < 0 or args.decode_tokens == 1:
        raise PrunekitError(f"--decode-tokens must be 0 (skip) or at least 2, got {args.decode_tokens}")
    if args.json is not None and args.json.is_dir():
        raise PrunekitError(f"--json {args.json} is a directory; give a file path")
    results = []
    for name in [args.model, *([args.vs] if args.vs else [])]:
        model, _ = prunekit.load_model(name, args.dtype, args.device, args.trust_remote_code)
        results.append(benchmark_speed(model, shapes, args.decode_tokens, args.repeats, label=str(name)))
        del model  # one model in memory at a time, so the second one's peak is its own
        gc.collect()
    ratios = compare_speed(results[0], results[1]) if args.vs else None
    machine = results[0].machine
    print(f"{machine['cpu_model']}, {machine['cpu_count']} CPUs, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), {results[0].dtype} on {results[0].device}; "
          f"median (min-max) of {args.repeats} runs after warm-up")
    print(format_table(*speed_table(results, ratios)))
    print(f"peak memory: {results[0].memory_method}" + ("; ratio = --model / --vs" if args.vs else ""))
    if args.json is not None:
        report = {"models": [r.to_dict() for r in results], "ratios": ratios,
                  "ratio_definition": "--model / --vs" if args.vs else None}
        _write_json(args.json, report)
    return 0


def _cap_seqlen(model, seqlen: int) -> int:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seqlen > limit:
        print(f"prunekit: --seqlen {seqlen} capped at the model's context of {limit}", file=sys.stderr)
        return int(limit)
    return seqlen


def _write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically, so an interrupted run never leaves a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(staging, path)


if __name__ == "__main__":
    sys.exit(main())
