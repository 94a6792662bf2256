"""Apply the rule that picks LLKD's defaults (docs/method.md, *How the defaults are chosen*) to
quality benchmark results.

    python benchmarks/defaults_rule.py RESULTS_DIR_OR_JSON [...] [--default "llkd (M=1)"] [--output FILE.md]
                                       [--quiet RESULTS_DIR_OR_JSON ...]

Every ``results.json`` given (``llkd bench quality`` output directories or files) is read; runs
are grouped by data set and by **configuration**: the variant's name plus the benchmark's
``--set`` overrides, so ``llkd (fill, M≤8)`` with ``selection.score_ttl=8`` is one configuration
whichever directory its seeds came from. Per configuration and data set:

- mean ± std of the final macro-F1 over its seeds (the full budget), and the seed count;
- the scoring share of FLOPs (mean over seeds);
- seconds per PFLOP, from its **quiet** runs only (no run marked ``loaded``; see the quiet protocol
  in docs/quality.md), against `all`'s quiet seconds per PFLOP on the same data set.

Then the rule: eligible are the configurations with a scoring share ≤ 30 % and seconds per PFLOP
within 10 % of `all`'s on every data set; among them the highest mean over the data sets of the
mean final macro-F1, unless it ends below today's default by more than the larger of the two
seed stds on a data set; none eligible: the defaults stay. A configuration measured on fewer than
3 seeds, or without a quiet run, is reported but cannot be picked (``incomplete``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

#: The rule's bars (docs/method.md).
MAX_SCORING_SHARE = 0.30
MAX_SECONDS_RATIO = 1.10
SEEDS = 3


def read_results(paths: list[Path], quiet: list[Path] = ()) -> list[dict[str, Any]]:
    """Every run of the given results, each tagged with its data set and configuration; the same
    (data set, configuration, seed) read twice counts once (the first file given wins its F1; a
    later quiet rerun lends it its seconds, so committed 3-seed F1 pairs with a quiet rerun's timing).
    The runs of ``quiet`` (also read) count as quiet whatever their ``loaded`` mark says."""
    quiet_files = {_file(path).resolve() for path in quiet}
    runs: dict[tuple[str, str, int], dict[str, Any]] = {}
    for path in [*paths, *(q for q in quiet if _file(q).resolve() not in {_file(p).resolve() for p in paths})]:
        file = _file(path)
        results = json.loads(file.read_text())
        dataset = results["data"]["name"]
        overrides = sorted(results["settings"].get("overrides") or [])
        for run in results["runs"]:
            if run.get("strategy", "llkd") not in ("all", "llkd"):
                continue  # the baselines are not candidate defaults of LLKD
            if file.resolve() in quiet_files:
                run = run | {"loaded": False}
            config = run["variant"] + "".join(f", {o}" for o in overrides)
            key = (dataset, config, run["seed"])
            if key not in runs:
                runs[key] = run | {"dataset": dataset, "config": config}
            elif run.get("loaded") is False and runs[key].get("loaded") is not False:
                runs[key] |= {"seconds_per_pflop": run.get("seconds_per_pflop"), "loaded": False}
    return list(runs.values())


def _file(path: Path) -> Path:
    return path / "results.json" if path.is_dir() else path


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def tabulate(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{configuration: {data set: figures}}."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        grouped[run["config"], run["dataset"]].append(run)
    table: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (config, dataset), mine in grouped.items():
        f1, f1_std = _mean_std([run["macro_f1"] for run in mine])
        share, _ = _mean_std([run["scoring_share"] for run in mine if run.get("scoring_share") is not None])
        quiet = [r["seconds_per_pflop"] for r in mine if r.get("seconds_per_pflop") and r.get("loaded") is False]
        seconds, _ = _mean_std(quiet)
        table[config][dataset] = {
            "seeds": len(mine), "f1": f1, "f1_std": f1_std, "scoring_share": share or 0.0,
            "seconds_per_pflop": seconds, "quiet_runs": len(quiet),
        }  # fmt: skip
    return table


def apply_rule(table: dict[str, dict[str, dict[str, Any]]], default: str) -> dict[str, Any]:
    """The rule's verdict per configuration and its pick (None: the defaults stay)."""
    datasets = sorted({d for sets in table.values() for d in sets})
    baseline = table.get("all", {})
    verdicts: dict[str, dict[str, Any]] = {}
    for config, sets in table.items():
        why: list[str] = []
        ratios: dict[str, float | None] = {}
        for dataset in datasets:
            figures = sets.get(dataset)
            if figures is None:
                why.append(f"not run on {dataset}")
                continue
            base = baseline.get(dataset, {}).get("seconds_per_pflop")
            seconds = figures["seconds_per_pflop"]
            ratios[dataset] = seconds / base if seconds and base else None
            if figures["scoring_share"] > MAX_SCORING_SHARE:
                why.append(f"scoring {100 * figures['scoring_share']:.0f} % on {dataset}")
            if ratios[dataset] is not None and ratios[dataset] > MAX_SECONDS_RATIO:
                why.append(f"{ratios[dataset]:.2f}x `all`'s seconds per PFLOP on {dataset}")
        incomplete = [
            d for d in datasets
            if d in sets and (sets[d]["seeds"] < SEEDS or ratios.get(d) is None)
        ]  # fmt: skip
        mean_f1 = statistics.fmean(sets[d]["f1"] for d in datasets) if all(d in sets for d in datasets) else None
        below = []
        for dataset in datasets:
            mine, theirs = sets.get(dataset), table.get(default, {}).get(dataset)
            if mine and theirs:
                slack = max(mine["f1_std"] or 0.0, theirs["f1_std"] or 0.0)
                if mine["f1"] < theirs["f1"] - slack:
                    below.append(f"{mine['f1'] - theirs['f1']:+.3f} against the default on {dataset}")
        verdicts[config] = {
            "ratios": ratios, "mean_f1": mean_f1, "ineligible": why, "incomplete": incomplete, "below_default": below,
        }  # fmt: skip
    pickable = [
        c for c, v in verdicts.items()
        if c != "all" and not v["ineligible"] and not v["incomplete"] and not v["below_default"] and v["mean_f1"]
    ]  # fmt: skip
    pick = max(pickable, key=lambda c: verdicts[c]["mean_f1"], default=None)
    return {"datasets": datasets, "verdicts": verdicts, "pick": pick}


def _cell(figures: dict[str, Any] | None, ratio: float | None) -> str:
    if figures is None:
        return "– | – | –"
    std = f" ± {figures['f1_std']:.3f}" if figures["seeds"] > 1 else ""
    seconds = "–" if ratio is None else f"{ratio:.2f}x"
    return f"{figures['f1']:.3f}{std} ({figures['seeds']}) | {100 * figures['scoring_share']:.0f} % | {seconds}"


def report(table: dict[str, dict[str, dict[str, Any]]], verdict: dict[str, Any], default: str) -> str:
    datasets = verdict["datasets"]
    head = " | ".join(f"{d}: macro-F1 (seeds) | {d}: scoring | {d}: s/PFLOP vs `all`" for d in datasets)
    lines = [
        f"| configuration | {head} | mean F1 | verdict |",
        "|---|" + "---:|" * (3 * len(datasets) + 1) + "---|",
    ]
    for config in sorted(table, key=lambda c: (c != "all", c != default, c)):
        v = verdict["verdicts"][config]
        cells = " | ".join(_cell(table[config].get(d), v["ratios"].get(d)) for d in datasets)
        mean = "–" if v["mean_f1"] is None else f"{v['mean_f1']:.3f}"
        if config == "all":
            said = "the baseline"
        elif v["ineligible"]:
            said = "ineligible: " + "; ".join(v["ineligible"])
        elif v["incomplete"]:
            said = "incomplete (fewer than 3 seeds or no quiet run) on " + ", ".join(v["incomplete"])
        elif v["below_default"]:
            said = "below the default: " + "; ".join(v["below_default"])
        else:
            said = "eligible"
        lines.append(f"| {config} | {cells} | {mean} | {said} |")
    pick = verdict["pick"]
    lines += [
        "",
        f"Pick: **{pick}**." if pick else f"Pick: none eligible and complete; the defaults stay (`{default}`).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files or benchmark output directories")
    parser.add_argument("--default", default="llkd (M=1)", help="today's default configuration")
    parser.add_argument(
        "--quiet",
        action="append",
        type=Path,
        default=[],
        help="results whose runs count as quiet whatever their `loaded` mark (say why where you report it)",
    )
    parser.add_argument("--output", type=Path, help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    table = tabulate(read_results(args.results, args.quiet))
    text = report(table, apply_rule(table, args.default), args.default)
    print(text, end="")
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
