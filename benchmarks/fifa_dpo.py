"""Does FiFA's subset match full-data Diffusion-DPO at a fraction of the compute, and beat a random
subset of the same size? Measured on ``shapes-prefs`` with the exact oracle as ground truth.

FiFA (Yang et al., ICLR 2025, arXiv 2410.10166) reports that DPO on under 0.5 % of Pick-a-Pic,
chosen by preference margin, text quality and prompt diversity, matches full-data DPO with a
fraction of the GPU hours. Here every variant trains ``method: dpo`` with the same settings and the
same number of optimiser steps (``--steps``, ``train.batch_size`` pairs each), evaluated with fixed
noise at several points along the way, 3 seeds each:

* ``all`` — every non-tie pair of the set;
* ``fifa`` — the FiFA subset (``--fraction`` of the pairs; the CLI's defaults for the set);
* ``random`` — a random subset of the same size (a new draw per seed);
* ``fifa-no-margin`` / ``fifa-no-quality`` / ``fifa-no-diversity`` — FiFA with one term's
  coefficient set to 0.

Fair budget: equal optimiser steps, so equal training compute; a subset is cycled through several
times, the full set about once — the paper's setting, where the subset's advantage is to reach the
full-data result sooner. "Compute to match" is read off the evaluations: the first evaluated step
at which a variant's train-prompt oracle change reaches the full-data run's final mean change.
FiFA's own cost (scoring every pair with the reward and every prompt for quality and diversity)
is measured and reported beside the training seconds.

Writes ``<output>/fifa_dpo.json`` (every run's curves, the subsets' reports, seconds),
``<output>/fifa_dpo.png`` (change since the base model against pairs seen, mean and min..max over
seeds) and prints a table.

    python -m diffalign.benchmarks.fifa_dpo --jobs 2                 # 6 variants x 3 seeds
    python -m diffalign.benchmarks.fifa_dpo --quick                  # smoke run on a small set
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from diffalign.benchmarks import seeded_runs

TRAIN_ORACLE = "eval/shapes-train/shapes-oracle"
HELDOUT_ORACLE = "eval/shapes-heldout/shapes-oracle"
TRAIN_CLIP = "eval/shapes-train/shapes-clip"
HELDOUT_CLIP = "eval/shapes-heldout/shapes-clip"
KEYS = [TRAIN_ORACLE, HELDOUT_ORACLE, TRAIN_CLIP, HELDOUT_CLIP]

# FiFA variants: the keys of FiFAConfig each one changes.
FIFA_VARIANTS: dict[str, dict] = {
    "fifa": {},
    "fifa-no-margin": {"margin_weight": 0.0},
    "fifa-no-quality": {"alpha": 0.0},
    "fifa-no-diversity": {"gamma": 0.0},
}
VARIANTS = ["all", "fifa", "random", *[name for name in FIFA_VARIANTS if name != "fifa"]]


def make_subsets(
    data: str,
    folder: Path,
    fraction: float,
    seeds: list[int],
    variants: list[str],
    *,
    reward: str | None = None,
    text_quality: str | None = None,
) -> dict:
    """Write each subset the variants train on; returns ``{variant: {seed or "any": path}}`` and
    reports. ``reward`` and ``text_quality`` default to what the preference set registers."""
    from diffalign import fifa
    from diffalign.preferences import open_preferences, write_subset

    folder.mkdir(parents=True, exist_ok=True)
    preferences = open_preferences(data)
    suffix = ".jsonl" if preferences.format == "jsonl" else ".parquet"  # subsets keep the input's format
    paths: dict[str, dict] = {"all": {"any": data}}
    reports: dict[str, dict] = {}
    for variant, changes in FIFA_VARIANTS.items():
        if variant not in variants:
            continue
        output = folder / f"{variant}{suffix}"
        report_dir = folder / f"{variant}-report"
        started = time.process_time()
        if output.is_file():  # made by an earlier, interrupted study: reuse (the selection is deterministic)
            summary = json.loads((report_dir / "report.json").read_text())
            seconds = summary.get("cpu_seconds")
        else:
            config = fifa.FiFAConfig(fraction=fraction, reward=reward, text_quality=text_quality, **changes)
            _, summary = fifa.filter_preferences(data, output, config, report_dir=report_dir, progress=False)
            seconds = time.process_time() - started
            summary["cpu_seconds"] = seconds
            (report_dir / "report.json").write_text(json.dumps(summary, indent=1))
        paths[variant] = {"any": str(output)}
        reports[variant] = summary
    if "random" in variants:
        count = fifa.FiFAConfig(fraction=fraction).kept(len(preferences))
        paths["random"] = {}
        for seed in seeds:
            output = folder / f"random-seed{seed}{suffix}"
            if not output.is_file():
                chosen = np.random.default_rng(seed).choice(len(preferences), size=count, replace=False)
                write_subset(preferences, sorted(chosen.tolist()), output)
            paths["random"][seed] = str(output)
    # Per variant (the first seed's draw for the random subset): what its labels are worth.
    truth = {variant: composition(next(iter(by_seed.values()))) for variant, by_seed in paths.items()}
    sizes = {variant: summary["kept"] for variant, summary in reports.items()}
    sizes["all"] = len(preferences)
    if "random" in paths:
        sizes["random"] = fifa.FiFAConfig(fraction=fraction).kept(len(preferences))
    return {
        "paths": paths,
        "reports": reports,
        "sizes": sizes,
        "composition": truth,
        "pairs": len(preferences),
        "ties": preferences.stats.ties,
    }


BROKEN = ("truncated", "ungrammatical", "off-grammar")


def composition(spec: str) -> dict | None:
    """What a data set's labels are worth by the ground truth its pairs carry (``shapes-prefs``'s
    columns): shares of broken prompts, and of well-formed pairs whose chosen image is better,
    equal or worse by the oracle, and of flipped labels. None when the pairs carry no truth."""
    from diffalign.preferences import open_preferences

    data = open_preferences(spec)
    counts = {"broken": 0, "better": 0, "equal": 0, "worse": 0, "flipped": 0}
    for start in range(0, len(data), 256):
        for pair in data.pairs(range(start, min(start + 256, len(data)))):
            extra = pair.extra
            if "prompt_kind" not in extra or "chosen_side" not in extra:
                return None
            counts["flipped"] += bool(extra.get("label_flipped"))
            if extra["prompt_kind"] in BROKEN:
                counts["broken"] += 1
                continue
            side = extra["chosen_side"]
            chosen, rejected = extra[f"oracle_{side}"], extra[f"oracle_{1 - side}"]
            counts["better" if chosen > rejected else "worse" if chosen < rejected else "equal"] += 1
    return {"pairs": len(data), **{key: value / len(data) for key, value in counts.items()}}


def evaluated_run(seed: int, evaluations: int, pairs_per_epoch: int, folder: Path) -> list[str]:
    """The overrides of a study's DPO run: ``evaluations`` epochs of ``pairs_per_epoch`` pairs, each
    followed by the fixed-noise evaluation, weights saved at the end, into ``folder``."""
    return [
        f"seed={seed}",
        f"epochs={evaluations}",
        f"dpo.pairs_per_epoch={pairs_per_epoch}",
        "eval.every=1",
        f"save_every={evaluations}",
        "tensorboard=false",
        f"output_dir={folder}",
    ]


def steps_to_match(run_changes: list[float], pairs_seen: list[int], target: float) -> int | None:
    """The first evaluated count of pairs seen at which the change reaches ``target`` (None: never)."""
    for seen, change in zip(pairs_seen, run_changes):
        if change >= target:
            return seen
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="shapes-prefs", help="preference set (registered name or path)")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fraction", type=float, default=0.1, help="FiFA's (and the random subset's) share")
    parser.add_argument("--reward", help="FiFA's margin reward (default: the set's registered default)")
    parser.add_argument("--text-quality", help="FiFA's text-quality scorer (default: the set's)")
    parser.add_argument("--steps", type=int, default=240, help="optimiser steps per run (every variant)")
    parser.add_argument(
        "--evaluations", type=int, default=4, help="evaluations along the run (plus the base)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="extra config override for every run"
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (torch threads = cores / jobs)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 variants, 8 steps")
    parser.add_argument(
        "--output", default="results/fifa_dpo", help="folder for the JSON, figure and subsets"
    )
    parser.add_argument(
        "--from-json", help="summarise the runs of an earlier study's fifa_dpo.json again (no training)"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        output = Path(args.output)
        if (output / "fifa_dpo.json").resolve() == Path(args.from_json).resolve():
            parser.error("--from-json would be overwritten by the summary: choose another --output")
        output.mkdir(parents=True, exist_ok=True)
        report(json.loads(Path(args.from_json).read_text()), output)
        return 0
    if args.quick:
        args.seeds, args.variants, args.steps, args.evaluations = [0], ["all", "fifa"], 8, 2

    from diffalign.config import load_config

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    probe = load_config(None, ["method=dpo", f"data={args.data}", *args.overrides])
    batch = probe.train.batch_size * probe.train.gradient_accumulation_steps
    if args.steps % args.evaluations:
        parser.error(f"--steps ({args.steps}) must be divisible by --evaluations ({args.evaluations})")
    steps_per_epoch = args.steps // args.evaluations  # one epoch between evaluations
    data = str(args.data)
    started = time.perf_counter()
    subsets = make_subsets(
        data,
        output / "subsets",
        args.fraction,
        args.seeds,
        args.variants,
        reward=args.reward,
        text_quality=args.text_quality,
    )
    print(f"subsets ready in {time.perf_counter() - started:.0f} s ({subsets['pairs']} pairs in the set)")

    def overrides(variant: str, seed: int, folder: Path) -> list[str]:
        paths = subsets["paths"][variant]
        return [
            "method=dpo",
            f"data={paths.get(seed, paths.get('any'))}",
            *args.overrides,
            *evaluated_run(seed, args.evaluations, steps_per_epoch * batch, folder),
        ]

    variants = {name: [] for name in args.variants}
    runs, execution = seeded_runs.run_grid(
        variants, args.seeds, overrides, KEYS, jobs=args.jobs, threads=args.threads, work_dir=str(output)
    )
    result = {
        "settings": {**vars(args), "steps_per_evaluation": steps_per_epoch, "pairs_per_step": batch},
        "data": {"pairs": subsets["pairs"], "ties_dropped": subsets["ties"]},
        "subsets": subsets["reports"],
        "composition": subsets["composition"],
        "sizes": subsets["sizes"],
        "execution": execution,
        "runs": runs,
    }
    report(result, output)
    return 0


def report(result: dict, output: Path) -> dict:
    """Summarise ``result``'s runs (change since each seed's base), write ``fifa_dpo.json`` and
    ``fifa_dpo.png`` into ``output`` and print the tables; returns the summary."""
    runs = result["runs"]
    summary = seeded_runs.summarise(runs, KEYS, TRAIN_ORACLE, 0.0)
    reference = summary["variants"].get("all", {}).get("final_change", {}).get(TRAIN_ORACLE, {}).get("mean")
    composition_of = result.get("composition", {})
    for variant, entry in summary["variants"].items():
        group = [run for run in runs if run["variant"] == variant]
        entry["train_seconds"] = [run["train_seconds"][-1] for run in group]
        entry["final_by_seed"] = {
            key: [run["curves"][key][-1] - run["curves"][key][0] for run in group] for key in entry["base"]
        }
        entry["seeds"] = [run["seed"] for run in group]
        entry["subset_pairs"] = (
            result.get("sizes", {}).get(variant)
            or (composition_of.get(variant) or {}).get("pairs")
            or (result["data"]["pairs"] if variant == "all" else None)
        )
        entry["fifa_cpu_seconds"] = result["subsets"].get(variant, {}).get("cpu_seconds")
        # Only a gain can be matched: when full-data DPO ends at or below its base, there is none.
        if reference is not None and reference > 0:
            entry["pairs_to_match_all"] = [
                steps_to_match(
                    (np.array(run["curves"][TRAIN_ORACLE][1:]) - run["curves"][TRAIN_ORACLE][0]).tolist(),
                    run["queries"][1:],
                    reference,
                )
                for run in group
            ]
    result = {**result, "summary": summary}
    (output / "fifa_dpo.json").write_text(json.dumps(result, indent=1, default=str))
    summary_for_plot = {**summary, "target_key": None}  # no target line: the study has no bar
    settings = result["settings"]
    seeded_runs.plot_changes(
        summary_for_plot,
        {"train oracle": TRAIN_ORACLE, "held-out oracle": HELDOUT_ORACLE, "shapes-clip (train)": TRAIN_CLIP},
        output / "fifa_dpo.png",
        f"Diffusion-DPO on {settings['data']}: {len(settings['seeds'])} seeds, "
        f"{settings['steps']} steps of {settings['pairs_per_step']} pairs",
        xlabel="preference pairs seen",
    )
    print(table(summary, reference))
    print(composition_table(composition_of))
    print(f"wrote {output / 'fifa_dpo.json'} and {output / 'fifa_dpo.png'}")
    return summary


def table(summary: dict, reference: float | None) -> str:
    """Final change since each seed's base (mean ± std over seeds) per variant, and the seconds."""
    header = (
        "| variant | pairs | train oracle by seed | train oracle | held-out oracle | shapes-clip (train) "
        "| train s | FiFA s | pairs seen to match `all` |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for variant, entry in summary["variants"].items():
        final = entry["final_change"]

        def cell(key: str, final: dict = final) -> str:
            return f"{final[key]['mean']:+.3f} ± {final[key]['std']:.3f}" if key in final else "–"

        fifa_seconds = entry.get("fifa_cpu_seconds")
        seeds = " / ".join(f"{value:+.3f}" for value in entry["final_by_seed"].get(TRAIN_ORACLE, []))
        if reference is None or reference <= 0:
            matched = "no gain to match"
        else:
            matched = ", ".join("never" if m is None else str(m) for m in entry.get("pairs_to_match_all", []))
        lines.append(
            f"| {variant} | {entry.get('subset_pairs')} | {seeds} | {cell(TRAIN_ORACLE)} | {cell(HELDOUT_ORACLE)} | "
            f"{cell(TRAIN_CLIP)} | {np.mean(entry['train_seconds']):.0f} | "
            f"{'–' if fifa_seconds is None else f'{fifa_seconds:.0f}'} | {matched} |"
        )
    return "\n".join(lines)


def composition_table(truth: dict) -> str:
    """Shares of each training set's pairs by what the oracle says of their labels."""
    lines = [
        "| data | pairs | chosen better | equal | chosen worse | broken prompt | label flipped |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, entry in truth.items():
        if entry is None:
            continue
        shares = " | ".join(f"{entry[key]:.1%}" for key in ("better", "equal", "worse", "broken", "flipped"))
        lines.append(f"| {variant} | {entry['pairs']} | {shares} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
