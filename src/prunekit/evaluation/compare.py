"""``prunekit compare``: every method at every ratio on one model, each cell measured the same way.

A compare run lives in one directory::

    compare.json          the settings every cell shares (a rerun with other settings is refused)
    cells/dense.json      the dense model's measurements (the reference of every speed-up)
    cells/M@R.json        one finished cell: method M at ratio R (or its one-line error)
    states/               resumable methods' progress (a depth search shared by all ratios of its method)
    logs/M@R.txt          the traceback of a failed cell
    results.* report.html plots/   written by ``report.compare`` from the cells

Each cell starts from a fresh copy of the dense weights (weight-editing methods change them), prunes with the
calibration windows drawn once for the whole run, and records parameters, both ratios, perplexity per corpus,
zero-shot accuracy (lm-eval), prune time, the peak memory growth while pruning, and prefill / decode throughput;
``read_cells`` derives the speed-ups against the dense cell (so deleting ``cells/dense.json`` and rerunning
measures the reference again, and every speed-up follows). A finished cell is never recomputed (delete its file to
recompute it); a killed run loses only the cell in progress (and a resumable method continues inside it); a cell
that fails records its error and the others still run.

Nested depth methods (BlockPruner, SLEB) keep one search state per method: their cells run from the largest ratio
down, so the search runs once, at the largest ratio, and every smaller ratio takes a prefix of its schedule.
"""

from __future__ import annotations

import copy
import datetime
import gc
import json
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from prunekit._atomic import write_json_atomic
from prunekit.errors import PrunekitError

COMPARE_FORMAT, COMPARE_VERSION = "prunekit-compare", 1
DENSE = "dense"


@dataclass(frozen=True)
class CompareSettings:
    """Everything that changes a cell's result (methods and ratios do not: a rerun may add more)."""

    model: str
    dtype: str = "float32"
    device: str = "cpu"
    calib: str = "mix"
    calib_tokens: int = 16384
    seqlen: int = 512
    calib_windows: str = "random"
    bos: str = "auto"
    seed: int = 0
    ratio_of: str = "all"
    eval_corpora: tuple[str, ...] = ("mix", "jargon")
    eval_tokens: int = 16384
    eval_seqlen: int = 512
    tasks: tuple[str, ...] = ("prunekit_continuation", "prunekit_lastword")
    task_limit: int | None = None
    task_batch_size: int = 16
    speed_shapes: tuple[tuple[int, int], ...] = ((1, 512),)
    decode_tokens: int = 32
    speed_repeats: int = 3
    options: dict[str, dict[str, str]] = field(default_factory=dict)  # per method: KEY=VALUE overrides

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["speed_shapes"] = [f"{b}x{n}" for b, n in self.speed_shapes]
        data["eval_corpora"], data["tasks"] = list(self.eval_corpora), list(self.tasks)
        return data


def cell_name(method: str, ratio: float) -> str:
    """``slimgpt@0.2``: the cell's file stem and label."""
    return f"{method}@{ratio:g}"


def cell_order(methods: Sequence[str], ratios: Sequence[float]) -> list[tuple[str, float]]:
    """Methods in the given order; a nested method's ratios from the largest down (its search runs once)."""
    from prunekit.methods import method_info

    order = []
    for method in methods:
        nested = method_info(method).capabilities.nested
        order += [(method, ratio) for ratio in sorted(ratios, reverse=nested)]
    return order


def check_request(settings: CompareSettings, methods: Sequence[str], ratios: Sequence[float]) -> None:
    """Every method, ratio and option checked before anything loads (one line each)."""
    from prunekit.data.corpora import check_source
    from prunekit.data.windows import check_one_window
    from prunekit.methods import Target, method_info

    if not methods:
        raise PrunekitError("--methods is empty; give method names (see 'prunekit methods')")
    if not ratios:
        raise PrunekitError("--ratios is empty; give fractions such as 0.1,0.2,0.3")
    for ratio in ratios:
        Target(ratio, settings.ratio_of)
    for method in settings.options:
        if method not in methods:
            raise PrunekitError(f"--option for '{method}', which is not in --methods")
    for method in methods:
        method_info(method).configure(settings.options.get(method, {}))
    for source in [settings.calib, *settings.eval_corpora]:
        check_source(source)
    check_one_window(settings.calib_tokens, "--calib-tokens", settings.seqlen)
    check_one_window(settings.eval_tokens, "--eval-tokens", settings.eval_seqlen, "--eval-seqlen")


def check_run(out: Path, settings: CompareSettings) -> bool:
    """Whether ``out`` already holds this run; a one-line error if it holds anything else."""
    manifest = out / "compare.json"
    if manifest.is_file():
        found = _read(manifest)
        if found.get("format") != COMPARE_FORMAT:
            raise PrunekitError(f"{out} holds something other than a prunekit compare run; choose another --out")
        wanted = settings.to_dict()
        differing = sorted(key for key, value in wanted.items() if found["settings"].get(key) != value)
        if differing:
            raise PrunekitError(f"{out} holds a compare run with other settings ({', '.join(differing)} differ); "
                                "rerun with the same settings, or choose another --out")
        return True
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrunekitError(f"{out} exists and is not a compare run; choose another --out")
    return False


def create_run(out: Path, settings: CompareSettings) -> None:
    """The run directory and its manifest (made only once the model and windows loaded, so that a bad model name
    leaves nothing behind)."""
    for folder in ("cells", "states", "logs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "compare.json", {"format": COMPARE_FORMAT, "version": COMPARE_VERSION,
                                             "settings": settings.to_dict()}, indent=2)


@dataclass
class Inputs:
    """What every cell shares: the dense model, its tokenizer, the calibration and evaluation windows."""

    model: nn.Module
    tokenizer: Any
    calibration: Any
    evaluation: dict[str, Any]


def load_inputs(settings: CompareSettings, need_calibration: bool) -> Inputs:
    """Load the dense model once and draw the calibration windows once (the same windows for every cell)."""
    import prunekit
    from prunekit.data.corpora import corpus_label
    from prunekit.data.windows import calibration_windows, evaluation_windows

    model, tokenizer = prunekit.load_model(settings.model, settings.dtype, settings.device)
    if tokenizer is None:
        raise PrunekitError(f"{settings.model} has no tokenizer files, which compare needs")
    calibration = None
    if need_calibration:
        split = "all" if Path(settings.calib).is_file() else "calibration"
        calibration = calibration_windows(tokenizer, settings.calib, settings.calib_tokens, settings.seqlen,
                                          settings.calib_windows, settings.seed, settings.bos, split=split)
    evaluation = {corpus_label(source): evaluation_windows(tokenizer, source, settings.eval_seqlen,
                                                           settings.eval_tokens, settings.bos)
                  for source in settings.eval_corpora}
    return Inputs(model, tokenizer, calibration, evaluation)


def measure(model: nn.Module, inputs: Inputs, settings: CompareSettings, progress: bool) -> dict[str, Any]:
    """Perplexity per corpus, zero-shot accuracy and speed of ``model`` (dense or pruned), as JSON."""
    from prunekit.evaluation.perplexity import perplexity
    from prunekit.evaluation.speed import benchmark_speed
    from prunekit.evaluation.zero_shot import zero_shot

    result: dict[str, Any] = {
        "perplexity": {name: perplexity(model, windows, progress=progress).perplexity
                       for name, windows in inputs.evaluation.items()},
    }
    if settings.tasks:
        result["zero_shot"] = zero_shot(model, inputs.tokenizer, settings.tasks, settings.task_batch_size,
                                        settings.task_limit, settings.seed, progress).to_dict()
    speed = benchmark_speed(model, settings.speed_shapes, settings.decode_tokens, settings.speed_repeats)
    result["speed"] = {
        "prefill_tokens_per_second": {r.shape: r.tokens_per_second.median for r in speed.prefill},
        "decode_tokens_per_second": speed.decode.tokens_per_second.median if speed.decode else None,
        "weight_bytes": speed.weight_bytes, "kv_bytes_per_token": speed.kv_bytes_per_token,
        "load_average": speed.machine.get("load_average"),
    }
    return result


def speedups(cell: dict[str, Any], dense: dict[str, Any]) -> dict[str, Any]:
    """Pruned / dense throughput (prefill per shape, decode); > 1 is faster."""
    from prunekit.evaluation.speed import ratio_or_none

    pruned, base = cell["speed"], dense["speed"]
    return {"prefill": {shape: ratio_or_none(value, base["prefill_tokens_per_second"].get(shape))
                        for shape, value in pruned["prefill_tokens_per_second"].items()},
            "decode": ratio_or_none(pruned["decode_tokens_per_second"], base["decode_tokens_per_second"])}


def run_cell(method: str, ratio: float, inputs: Inputs, settings: CompareSettings, out: Path,
             progress: bool) -> dict[str, Any]:
    """Prune a fresh copy of the dense model and measure it; the cell's JSON record.

    ``search_shared`` in the record: a nested method's cell that needed no new search step (its schedule came
    from a larger ratio's cell, whose prune time holds the search)."""
    from prunekit.evaluation.memory import PeakMemory
    from prunekit.methods import method_info, prune

    info = method_info(method)
    model = copy.deepcopy(inputs.model)  # weight-editing methods change the dense weights; every cell starts fresh
    state_path = None
    if info.capabilities.resumable:
        stem = method if info.capabilities.nested else cell_name(method, ratio)
        state_path = out / "states" / f"{stem}.json"
    steps_before = _search_steps(state_path)
    with PeakMemory(next(model.parameters()).device) as peak:
        result = prune(model, inputs.tokenizer, method, ratio, settings.ratio_of,
                       inputs.calibration if info.capabilities.needs_calibration else None, None, settings.seed,
                       progress, state_path=state_path, **settings.options.get(method, {}))
    if state_path is not None and not info.capabilities.nested:
        state_path.unlink(missing_ok=True)  # the cell's record now holds the result
    cell = {
        "status": "ok", "method": method, "ratio": ratio, "ratio_of": settings.ratio_of,
        "parameters": result.metrics["parameters"], "prune_seconds": result.metrics["prune_seconds"],
        "search_shared": info.capabilities.nested and steps_before is not None
        and steps_before == _search_steps(state_path),
        "prune_peak_memory_bytes": peak.bytes, "memory_method": peak.method,
        "settings": result.plan.settings, "seed": settings.seed,
        **kept_structure(result.plan),
    }
    cell.update(measure(result.model, inputs, settings, progress))
    del model, result
    gc.collect()
    return cell


def kept_structure(plan) -> dict[str, Any]:
    """What a plan keeps, per surviving layer (heads, KV heads, channels, blocks), and the removed layers."""
    layers = [{"layer": shape["source_layer"], "attention": shape["attention"], "mlp": shape["mlp"],
               "heads": shape["num_heads"], "kv_heads": shape["num_kv_heads"], "channels": shape["intermediate_size"]}
              for shape in plan.layer_shapes()]
    return {"layers": layers, "removed_layers": [i for i, layer in enumerate(plan.layers) if layer.layer_removed]}


def dense_cell(inputs: Inputs, settings: CompareSettings, progress: bool) -> dict[str, Any]:
    from prunekit.models.adapters import adapter_for
    from prunekit.structure.params import measured_ratios
    from prunekit.structure.plan import PruningPlan

    adapter = adapter_for(inputs.model)
    plan = PruningPlan.keep_all(adapter)
    cell = {"status": "ok", "method": DENSE, "ratio": 0.0,
            "parameters": measured_ratios(inputs.model, adapter).to_dict(), **kept_structure(plan)}
    cell.update(measure(inputs.model, inputs, settings, progress))
    return cell


def failure(method: str, ratio: float, error: BaseException, seconds: float, log_path: Path) -> dict[str, Any]:
    """A failed cell's record: its one-line error (the traceback goes to ``log_path``)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    line = text if isinstance(error, PrunekitError) else f"{type(error).__name__}: {text}".rstrip(": ")
    log_path.write_text("".join(traceback.format_exception(error)))
    return {"status": "failed", "method": method, "ratio": ratio, "error": line, "seconds": round(seconds, 2)}


def _stamp(cell: dict[str, Any], started: float) -> dict[str, Any]:
    cell["wall_seconds"] = round(time.perf_counter() - started, 2)
    cell["finished_at"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    cell["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return cell


def run_compare(out: str | Path, settings: CompareSettings, methods: Sequence[str], ratios: Sequence[float],
                progress: bool = True, retry_failed: bool = False,
                log: Callable[[str], None] = print) -> list[str]:
    """Run every missing cell (module docstring); returns the names of the cells computed now."""
    from prunekit.methods import method_info

    out = Path(out)
    check_request(settings, methods, ratios)
    exists = check_run(out, settings)
    todo = [(m, r) for m, r in cell_order(methods, ratios) if _needs_run(out, cell_name(m, r), retry_failed)]
    dense_path = out / "cells" / f"{DENSE}.json"
    if not todo and dense_path.is_file():
        return []
    need_calibration = any(method_info(m).capabilities.needs_calibration for m, _ in todo)
    inputs = load_inputs(settings, need_calibration)
    if not exists:
        create_run(out, settings)
    computed = []
    if not dense_path.is_file():
        started = time.perf_counter()
        log("compare: measuring the dense model")
        write_json_atomic(dense_path, _stamp(dense_cell(inputs, settings, progress), started), indent=2)
        computed.append(DENSE)
    for index, (method, ratio) in enumerate(todo, 1):
        name = cell_name(method, ratio)
        log(f"compare: cell {index}/{len(todo)}: {name}")
        started = time.perf_counter()
        try:
            cell = run_cell(method, ratio, inputs, settings, out, progress)
        except Exception as error:  # noqa: BLE001  (one cell's failure is recorded; the others still run)
            cell = failure(method, ratio, error, time.perf_counter() - started, out / "logs" / f"{name}.txt")
            log(f"compare: {name} failed: {cell['error']}")
        write_json_atomic(out / "cells" / f"{name}.json", _stamp(cell, started), indent=2, allow_nan=True)
        computed.append(name)
    return computed


def _search_steps(state_path: Path | None) -> int | None:
    """Finished steps in a depth search's state file (None without one)."""
    if state_path is None or not state_path.is_file():
        return None
    return len(_read(state_path).get("steps", []))


def _needs_run(out: Path, name: str, retry_failed: bool) -> bool:
    path = out / "cells" / f"{name}.json"
    if not path.is_file():
        return True
    return retry_failed and _read(path).get("status") != "ok"


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def read_cells(out: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's settings and every recorded cell (dense first), for the report."""
    out = Path(out)
    settings = _read(out / "compare.json")["settings"]
    cells = [_read(path) for path in sorted((out / "cells").glob("*.json"))]
    cells.sort(key=lambda cell: (cell["method"] != DENSE, cell["method"], cell["ratio"]))
    dense = next((cell for cell in cells if cell["method"] == DENSE and cell["status"] == "ok"), None)
    for cell in cells:
        # Derived here, not stored: the dense cell can be measured again (delete its file and rerun) and every
        # speed-up follows.
        if dense is not None and cell["status"] == "ok" and cell["method"] != DENSE:
            cell["speedup"] = speedups(cell, dense)
    return settings, cells
