"""How fast does each method climb, per reward query? DDPO, DDPO+DiffExp, AlignProp,
AlignProp+DiffExp and DPOK on ShapesWorld with the ``shapes-clip`` reward, several seeds each.

Every variant gets the same budget of reward queries (sampled images that were rewarded) and
is evaluated at the same points with fixed noise: the proxy reward and the exact oracle's
alignment on train and held-out prompts. The study writes

* ``results/sample_efficiency.json`` — every run's curve, per-variant mean and spread,
* ``results/sample_efficiency.png`` — curves against reward queries (mean, min-max band),
* a table: queries each seed needed to raise its train-oracle alignment by a fixed amount, the
  final change of each curve since the base model, seconds per run.

    python -m diffalign.benchmarks.sample_efficiency           # 5 variants x 3 seeds, ~45-60 min on 2 cores
    python -m diffalign.benchmarks.sample_efficiency --quick   # smoke run, ~2 min

Runs execute ``--jobs`` at a time, each with ``cores / jobs`` torch threads (on 2 cores two
single-threaded runs finish sooner than one two-threaded run after the other, because torch's
own two threads scale poorly on these small models). From Python: ``run(...)``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS: dict[str, list[str]] = {
    "ddpo": ["method=ddpo"],
    "ddpo+diffexp": ["method=ddpo", "exploration=diffexp"],
    "alignprop": ["method=alignprop"],
    "alignprop+diffexp": ["method=alignprop", "exploration=diffexp"],
    "dpok": ["method=dpok"],
}
TRAIN_ORACLE = "eval/shapes-train/shapes-oracle"
CURVES = {
    "proxy (train prompts)": "eval/shapes-train/shapes-clip",
    "oracle alignment, train prompts": TRAIN_ORACLE,
    "oracle alignment, held-out prompts": "eval/shapes-heldout/shapes-oracle",
}


@dataclass
class Study:
    """The settings shared by every run of the study."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    epochs: int = 20
    samples_per_epoch: int = 32
    eval_every: int = 4
    eval_size: int = 64
    num_steps: int = 20
    target_gain: float = 0.03  # "reach" = a seed's train-oracle alignment up this much from its base
    extra: list[str] = field(default_factory=list)

    def overrides(self, variant: str, seed: int, output_dir: Path) -> list[str]:
        batch = min(16, self.samples_per_epoch)
        return [
            *VARIANTS[variant],
            "model=shapes", "reward=shapes-clip", "prompts=shapes-train",
            f"seed={seed}", f"epochs={self.epochs}", f"output_dir={output_dir}",
            f"sample.num_steps={self.num_steps}", f"sample.batch_size={batch}",
            f"sample.num_batches_per_epoch={self.samples_per_epoch // batch}",
            f"eval.every={self.eval_every}", f"eval.size={self.eval_size}",
            "eval.prompt_sets=[shapes-train, shapes-heldout]", "eval.rewards=[shapes-oracle]",
            "save_every=1000", "keep_checkpoints=1", "tensorboard=false",
            *self.extra,
        ]


def _one_run(args: tuple[Study, str, int, str, int]) -> dict:
    """Train one (variant, seed) and return its evaluated curve; runs in a worker process."""
    study, variant, seed, folder, threads = args
    import torch

    torch.set_num_threads(threads)
    from diffalign.config import load_config
    from diffalign.train import train

    started = time.perf_counter()
    config = load_config(None, study.overrides(variant, seed, Path(folder) / f"{variant}-seed{seed}"))
    history = train(config, progress=False).history
    evaluated = [record for record in history if TRAIN_ORACLE in record]
    return {
        "variant": variant,
        "seed": seed,
        "seconds": time.perf_counter() - started,
        "queries": [record["samples_seen"] for record in evaluated],
        "curves": {key: [record[key] for record in evaluated] for key in CURVES.values()},
    }


def queries_to_reach(queries: list[int], values: list[float], target: float) -> int | None:
    """The first evaluated query count at which ``values`` reaches ``target`` (None if never)."""
    for count, value in zip(queries, values):
        if value >= target:
            return count
    return None


def summarise(runs: list[dict], target_gain: float) -> dict:
    """Per variant: mean/min/max of each curve's change since that seed's base model, the queries
    each seed needed to raise its train-oracle alignment by ``target_gain``, final changes, seconds.

    Each seed evaluates its own fixed prompts and noise, so base values differ between seeds;
    changes since the base are what compare across seeds and variants.
    """
    summary = {"target_gain": target_gain, "variants": {}}
    for variant in dict.fromkeys(run["variant"] for run in runs):
        group = [run for run in runs if run["variant"] == variant]
        deltas = {
            key: np.array([np.array(run["curves"][key]) - run["curves"][key][0] for run in group])
            for key in CURVES.values()
        }
        summary["variants"][variant] = {
            "queries": group[0]["queries"],
            "base": {key: float(np.mean([run["curves"][key][0] for run in group])) for key in CURVES.values()},
            "change": {
                key: {"mean": d.mean(0).tolist(), "min": d.min(0).tolist(), "max": d.max(0).tolist()}
                for key, d in deltas.items()
            },
            "queries_to_target": [
                queries_to_reach(run["queries"], deltas[TRAIN_ORACLE][i].tolist(), target_gain)
                for i, run in enumerate(group)
            ],
            "final_change": {
                key: {"mean": float(d[:, -1].mean()), "std": float(d[:, -1].std())} for key, d in deltas.items()
            },
            "seconds_mean": float(np.mean([run["seconds"] for run in group])),
        }
    return summary


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 4))
    for axis, (title, key) in zip(axes, CURVES.items()):
        for variant, entry in summary["variants"].items():
            change, queries = entry["change"][key], entry["queries"]
            (line,) = axis.plot(queries, change["mean"], marker="o", markersize=3, label=variant)
            axis.fill_between(queries, change["min"], change["max"], color=line.get_color(), alpha=0.12)
        if key == TRAIN_ORACLE:
            axis.axhline(summary["target_gain"], color="grey", linestyle=":", label="target")
        axis.axhline(0, color="black", linewidth=0.6)
        axis.set_title(f"{title}: change")
        axis.set_xlabel("reward queries")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("ShapesWorld, shapes-clip reward: change since the base model (mean over seeds, band = min..max)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def format_table(summary: dict) -> str:
    names = {"proxy": CURVES["proxy (train prompts)"], "train oracle": TRAIN_ORACLE,
             "held-out oracle": CURVES["oracle alignment, held-out prompts"]}
    lines = [
        f"queries to target: reward queries until a seed's train-oracle alignment is up {summary['target_gain']:+.3f}"
        " ('-' = not within the budget); changes are final minus base, mean ± std over seeds",
        f"{'variant':<19} {'queries to target':<20}" + "".join(f"{'Δ ' + n:>20}" for n in names) + f" {'s/run':>7}",
    ]
    for variant, entry in summary["variants"].items():
        reached = ", ".join("-" if q is None else str(q) for q in entry["queries_to_target"])
        changes = "".join(
            f"{entry['final_change'][key]['mean']:>+13.3f} ± {entry['final_change'][key]['std']:.3f}"
            for key in names.values()
        )
        lines.append(f"{variant:<19} {reached:<20}{changes} {entry['seconds_mean']:>7.0f}")
    return "\n".join(lines)


def run(study: Study, *, jobs: int = 2, work_dir: str | None = None) -> dict:
    """Run every (variant, seed) of ``study`` and return runs plus summary."""
    cores = os.cpu_count() or 1
    threads = max(1, cores // jobs)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work_dir) as folder:
        tasks = [(study, variant, seed, folder, threads) for variant in study.variants for seed in study.seeds]
        if jobs == 1:
            runs = [_one_run(task) for task in tasks]
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                runs = list(pool.map(_one_run, tasks))
    return {
        "study": asdict(study),
        "jobs": jobs,
        "threads_per_run": threads,
        "cpu_count": cores,
        "wall_seconds": time.perf_counter() - started,
        "runs": runs,
        "summary": summarise(runs, study.target_gain),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--eval-size", type=int, default=64, help="images per evaluated prompt set")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (torch threads = cores / jobs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override applied to every run")
    parser.add_argument("--output", default=str(RESULTS / "sample_efficiency.json"))
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs of 8 samples, 5 steps: a smoke run")
    parser.add_argument("--from-json", metavar="PATH",
                        help="re-summarise, re-plot and re-print a finished study's JSON without running it")
    args = parser.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text("utf-8"))
        result["summary"] = summarise(result["runs"], result["study"]["target_gain"])
        Path(args.from_json).write_text(json.dumps(result, indent=1), "utf-8")
        plot(result["summary"], Path(args.from_json).with_suffix(".png"))
        print(format_table(result["summary"]))
        return 0
    study = Study(seeds=args.seeds, variants=args.variants, epochs=args.epochs, eval_every=args.eval_every,
                  eval_size=args.eval_size, extra=args.set)
    if args.quick:
        study = Study(seeds=args.seeds[:1], variants=args.variants, epochs=2, samples_per_epoch=8, eval_every=1,
                      eval_size=8, num_steps=5, extra=["train.batch_size=4", *args.set])
    result = run(study, jobs=args.jobs)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1), "utf-8")
    plot(result["summary"], output.with_suffix(".png"))
    print(format_table(result["summary"]))
    print(f"wall time {result['wall_seconds']:.0f} s ({args.jobs} jobs); wrote {output} and {output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
