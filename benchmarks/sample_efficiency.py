"""How fast does each method climb, per reward query? DDPO, DDPO+DiffExp, AlignProp,
AlignProp+DiffExp and DPOK on ShapesWorld with the ``shapes-clip`` reward, several seeds each.

Every variant gets the same budget of reward queries (sampled images that were rewarded) and
is evaluated at the same points with fixed noise: the proxy reward and the exact oracle's
alignment on train and held-out prompts. The study writes

* ``results/sample_efficiency.json`` — every run's curve, per-variant mean and spread,
* ``results/sample_efficiency.png`` — curves against reward queries (mean, min-max band),
* a table: queries needed to reach a fixed train-oracle alignment, final values, seconds.

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
    target_gain: float = 0.03  # "reach" = train-oracle alignment at base + this
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
    """Per variant: mean/min/max curves, queries to the target alignment, final values, seconds."""
    base = float(np.mean([run["curves"][TRAIN_ORACLE][0] for run in runs]))
    target = base + target_gain
    summary = {"base_train_oracle": base, "target_train_oracle": target, "variants": {}}
    for variant in dict.fromkeys(run["variant"] for run in runs):
        group = [run for run in runs if run["variant"] == variant]
        curves = {}
        for key in CURVES.values():
            values = np.array([run["curves"][key] for run in group])
            curves[key] = {"mean": values.mean(0).tolist(), "min": values.min(0).tolist(), "max": values.max(0).tolist()}
        reached = [queries_to_reach(run["queries"], run["curves"][TRAIN_ORACLE], target) for run in group]
        summary["variants"][variant] = {
            "queries": group[0]["queries"],
            "curves": curves,
            "queries_to_target": reached,
            "final": {key: {"mean": float(np.mean([r["curves"][key][-1] for r in group])),
                            "std": float(np.std([r["curves"][key][-1] for r in group]))} for key in CURVES.values()},
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
            curve, queries = entry["curves"][key], entry["queries"]
            (line,) = axis.plot(queries, curve["mean"], marker="o", markersize=3, label=variant)
            axis.fill_between(queries, curve["min"], curve["max"], color=line.get_color(), alpha=0.15)
        if key == TRAIN_ORACLE:
            axis.axhline(summary["target_train_oracle"], color="grey", linestyle=":", label="target")
        axis.set_title(title)
        axis.set_xlabel("reward queries")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("ShapesWorld, shapes-clip reward: mean over seeds, band = min..max")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def format_table(summary: dict) -> str:
    short = {key: name.split(",")[-1].strip().replace(" prompts", "") for name, key in CURVES.items()}
    lines = [
        f"target: train-oracle alignment {summary['target_train_oracle']:.3f} "
        f"(base {summary['base_train_oracle']:.3f})",
        f"{'variant':<19} {'queries to target (per seed)':<30} "
        + " ".join(f"{'final ' + short[key]:>22}" for key in CURVES.values()) + f" {'s/run':>7}",
    ]
    for variant, entry in summary["variants"].items():
        reached = ", ".join("-" if q is None else str(q) for q in entry["queries_to_target"])
        finals = " ".join(
            f"{entry['final'][key]['mean']:>15.3f} ± {entry['final'][key]['std']:.3f}" for key in CURVES.values()
        )
        lines.append(f"{variant:<19} {reached:<30} {finals} {entry['seconds_mean']:>7.0f}")
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
    args = parser.parse_args(argv)
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
