"""Depth pruning on SmolLM2-135M: held-out perplexity of BlockPruner, ShortGPT and SLEB at matched ratios.

For each calibration size (default 4,096 and 32,768 tokens: sequential 512-token windows from the start of the
calibration split of ``--calib``, i.e. one contiguous stretch of text, as in the golden case):

- BlockPruner searches 16 steps once (the schedule is nested, so K = 4, 8, 12, 16 are its prefixes);
- ShortGPT and SLEB remove the number of whole layers whose parameter share is closest to BlockPruner's at each K
  (SLEB's schedule is nested too, so it searches once, to the largest count);
- every pruned model is materialised and scored on the evaluation splits of ``--eval`` (text disjoint from the
  calibration) and on the calibration windows themselves (so ShortGPT, which never scores perplexity while it
  searches, gets a calibration perplexity too; the searches' own figure is kept as ``search_calibration_ppl``).

The searches keep their state in ``benchmarks/results/depth_heldout/`` and the evaluations are cached in the
results file, so the benchmark can be run in pieces (``--max-new-steps``) across sessions and picks up where it
stopped. Writes ``benchmarks/results/depth_heldout.{json,md}`` with the machine and date of every invocation.

    .venv/bin/python benchmarks/depth_heldout.py --sizes 4096                  # one size
    .venv/bin/python benchmarks/depth_heldout.py --max-new-steps 3             # at most 3 search steps per search
    .venv/bin/python benchmarks/depth_heldout.py --sizes 32768 --carry-mb 6144 # more memory for carried streams
    .venv/bin/python benchmarks/depth_heldout.py --sizes 32768 --defer-sleb    # score the others before SLEB's search
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import prunekit
from prunekit.data import calibration_windows, evaluation_windows
from prunekit.errors import PrunekitError
from prunekit.evaluation.machine import machine_info
from prunekit.methods import Target, method_info
from prunekit.methods.depth import LAYER, Unit, plan_from_units, removal_ratios
from prunekit.methods.shortgpt import layer_influence
from prunekit.models.adapters import adapter_for
from prunekit.report import console_summaries, format_table

RESULTS = Path(__file__).resolve().parent / "results"
STATES = RESULTS / "depth_heldout"
BLOCK_COUNTS = (4, 8, 12, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,32768", help="calibration tokens, comma-separated")
    parser.add_argument("--calib", default="pydocs")
    parser.add_argument("--eval", default="pydocs,kjv", help="held-out evaluation corpora, comma-separated")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--max-new-steps", type=int, default=0, help="pause each search after this many steps")
    parser.add_argument("--carry-mb", type=int, default=None,
                        help="memory cap of the fast search's carried streams (default: the method's)")
    parser.add_argument("--random-windows", action="store_true",
                        help="also run all three on seeded random windows from the whole calibration split "
                             "(same token count and cost; the diverse-calibration remedy)")
    parser.add_argument("--defer-sleb", action="store_true",
                        help="leave SLEB's search for a later run, so BlockPruner and ShortGPT are scored now")
    args = parser.parse_args()
    search = {"max_steps": args.max_new_steps}  # neither changes a schedule, so neither is part of the state
    if args.carry_mb is not None:
        search["carry_mb"] = args.carry_mb

    out = RESULTS / "depth_heldout.json"
    report = json.loads(out.read_text()) if out.exists() else {"sessions": [], "runs": {}}
    report["sessions"].append(machine_info())
    dense, tokenizer = prunekit.load_model("smollm2-135m")
    adapter = adapter_for(dense)
    evaluation = {name: evaluation_windows(tokenizer, name, 512, args.eval_tokens) for name in args.eval.split(",")}
    report["evaluation"] = {name: windows.describe() for name, windows in evaluation.items()}
    report.setdefault("runs", {})["dense"] = report["runs"].get("dense") or _evaluate(dense, evaluation)
    for size in [int(value) for value in args.sizes.split(",")]:
        windows = calibration_windows(tokenizer, args.calib, size, 512, "sequential")
        models = {key: (*value, windows) for key, value in
                  _plans(dense, adapter, windows, size, search, defer_sleb=args.defer_sleb).items()}
        if args.random_windows:
            diverse = calibration_windows(tokenizer, args.calib, size, 512, "random", seed=0)
            models.update({key: (*value, diverse) for key, value in
                           _plans(dense, adapter, diverse, size, search, "random",
                                  defer_sleb=args.defer_sleb).items()})
        dense_calibration = report.setdefault("dense_calibration_ppl", {})
        calibrations = {str(size): windows, **({f"{size}_random": diverse} if args.random_windows else {})}
        for name, scored_on in calibrations.items():
            if name not in dense_calibration:
                dense_calibration[name] = prunekit.perplexity(dense, scored_on, progress=False).perplexity
        for key, (plan, calibration_ppl, ratio, scored_on) in models.items():
            if key not in report["runs"]:
                pruned = prunekit.apply_plan(copy.deepcopy(dense), plan)
                measured = prunekit.perplexity(pruned, scored_on, progress=False).perplexity
                report["runs"][key] = {**_evaluate(pruned, evaluation), "calibration_ppl": measured,
                                       "search_calibration_ppl": calibration_ppl, "ratio_all": ratio,
                                       "calibration_tokens": size}
                print(key, json.dumps(report["runs"][key]), flush=True)
                _write(out, report)
    _write(out, report)
    print(_markdown(report))


def _name(method: str, variant: str) -> str:
    return f"{method}_{variant}" if variant else method


def _blockpruner_plans(dense, adapter, windows, size: int, search: dict, variant: str = "") -> dict:
    """{run key: (plan, search calibration ppl, ratio_all)} at K = BLOCK_COUNTS, once the search has finished."""
    name = _name("blockpruner", variant)
    schedule = _search("blockpruner", dense, adapter, windows, size, max(BLOCK_COUNTS), search, f"{name}-{size}")
    if schedule is None:
        return {}
    units = [Unit(kind, layer) for kind, layer in schedule["order"]]
    return {f"{name}-{size}-K{count}": (plan_from_units(adapter, units[:count]), schedule["calibration_ppl"][count],
                                        schedule["ratio_all"][count]) for count in BLOCK_COUNTS}


def _plans(dense, adapter, windows, size: int, search: dict, variant: str = "", defer_sleb: bool = False) -> dict:
    """{run key: (plan, calibration ppl or None, ratio_all)} for every finished search on these windows.

    ``variant`` names runs on other windows than the sequential ones (``random``: the diverse-calibration remedy);
    ShortGPT and SLEB then see the same windows as BlockPruner, so the comparison stays like for like.
    ``defer_sleb`` leaves SLEB out (its search is the long one), as a paused search would.
    """
    plans = _blockpruner_plans(dense, adapter, windows, size, search, variant)
    if not plans:
        return plans
    layer_counts = {count: _closest_layer_count(adapter, plans[f"{_name('blockpruner', variant)}-{size}-K{count}"][2])
                    for count in BLOCK_COUNTS}
    scores = layer_influence(dense, adapter, windows, progress=False)
    order = sorted(range(adapter.num_layers), key=lambda layer: (scores[layer], layer))
    for count, layers in layer_counts.items():
        removed = [Unit(LAYER, layer) for layer in order[:layers]]
        plans[f"{_name('shortgpt', variant)}-{size}-K{count}"] = (plan_from_units(adapter, removed), None,
                                                                  removal_ratios(adapter, removed)[0])
    if defer_sleb:
        return plans
    sleb_name = _name("sleb", variant)
    sleb = _search("sleb", dense, adapter, windows, size, max(layer_counts.values()), search, f"{sleb_name}-{size}")
    if sleb is not None:
        sleb_units = [Unit(kind, layer) for kind, layer in sleb["order"]]
        for count, layers in layer_counts.items():
            plans[f"{sleb_name}-{size}-K{count}"] = (plan_from_units(adapter, sleb_units[:layers]),
                                                     sleb["calibration_ppl"][layers], sleb["ratio_all"][layers])
    return plans


def _search(method: str, dense, adapter, windows, size: int, blocks: int, search: dict,
            state: str | None = None) -> dict | None:
    """The method's nested schedule with ``blocks`` steps, or None while the (resumable) search is paused."""
    state = state or f"{method}-{size}"
    try:
        artifacts = method_info(method).apply_to(dense, Target(blocks=blocks), windows, state_path=STATES /
                                                 f"{state}-state.json", **search).artifacts
    except PrunekitError as error:
        print(f"{method} at {size} tokens: {error}")
        return None
    return artifacts[f"{method}_schedule.json"]


def _closest_layer_count(adapter, ratio: float) -> int:
    """The number of whole layers whose removal share is closest to ``ratio`` (ties: fewer layers)."""
    shares = [removal_ratios(adapter, [Unit(LAYER, layer) for layer in range(count)])[0]
              for count in range(adapter.num_layers)]
    return min(range(1, adapter.num_layers), key=lambda count: (abs(shares[count] - ratio), count))


def _evaluate(model, evaluation: dict) -> dict:
    return {"ppl": {name: prunekit.perplexity(model, windows, progress=False).perplexity
                    for name, windows in evaluation.items()}}


def _row_order(key: str) -> tuple:
    """Size, then calibration variant (sequential first), then K, then method."""
    method, size, count = key.split("-")
    base, _, variant = method.partition("_")
    return int(size), variant, int(count[1:]), base


def _dense_order(name: str) -> tuple:
    size, _, variant = name.partition("_")
    return int(size), variant


def _write(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(report))


def _markdown(report: dict) -> str:
    runs = report["runs"]
    corpora = list(runs["dense"]["ppl"])
    headers = ["method", "calib tokens", "K", "ratio_all", "calib ppl", *[f"{name} ppl" for name in corpora]]
    rows = [["dense", "", "", "0.00%", "", *[f"{runs['dense']['ppl'][name]:.2f}" for name in corpora]]]
    for name, ppl in sorted(report.get("dense_calibration_ppl", {}).items(), key=lambda item: _dense_order(item[0])):
        size, _, variant = name.partition("_")  # keyed "<size>[_<variant>]"
        rows.append([_name("dense", variant), size, "", "0.00%", f"{ppl:.2f}", *[""] * len(corpora)])
    for key in sorted((key for key in runs if key != "dense"), key=_row_order):
        run = runs[key]
        method, size, count = key.split("-")
        calib = f"{run['calibration_ppl']:.2f}"
        rows.append([method, size, count[1:], f"{run['ratio_all']:.2%}", calib,
                     *[f"{run['ppl'][name]:.2f}" for name in corpora]])
    sessions = "\n".join(f"- {s.get('date')}: {s.get('cpu_model')} ({s.get('cpu_count')} cores), torch "
                         f"{s.get('torch')}, load {s.get('load_average')}" for s in report["sessions"])
    return "\n".join([
        "# Depth pruning on SmolLM2-135M: held-out perplexity", "",
        "K = BlockPruner sub-blocks removed; ShortGPT and SLEB remove the number of whole layers with the closest "
        "parameter share. Calibration: sequential 512-token windows from the start of the calibration split; "
        "`_random` runs: the same number of 512-token windows drawn at random (seed 0) from the whole calibration "
        "split. calib ppl: measured on the windows the run was calibrated on. "
        f"Evaluation: {report.get('evaluation')}.", "",
        "```", format_table(headers, rows), "```", "", "Invocations:", "", sessions, "",
    ])


if __name__ == "__main__":
    with console_summaries():
        main()
