"""How fast does each method climb, per reward query? DDPO, DDPO+DiffExp, AlignProp,
AlignProp+DiffExp and DPOK on ShapesWorld with the ``shapes-clip`` reward, several seeds each.

Every variant gets the same budget of reward queries (sampled images that were rewarded) and
is evaluated at the same points with fixed noise: the proxy reward and the exact oracle's
alignment on train and held-out prompts. The study writes, in ``--output`` (default
``./results/sample_efficiency/``),

* ``sample_efficiency.json`` — every run's curve, per-variant mean and spread,
* ``sample_efficiency.png`` — curves against reward queries (mean, min-max band),
* a table: queries each seed needed to raise its train-oracle alignment by a fixed amount, the
  final change of each curve since the base model, seconds per run.

    python -m diffalign.benchmarks.sample_efficiency           # 5 variants x 3 seeds, ~45-60 min on 2 cores
    python -m diffalign.benchmarks.sample_efficiency --quick   # smoke run, ~2 min

Runs execute ``--jobs`` at a time (see ``seeded_runs.py``). From Python: ``run(...)``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffalign.benchmarks import seeded_runs
from diffalign.benchmarks.seeded_runs import queries_to_reach  # noqa: F401 - part of this study's API

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
            "model=shapes",
            "reward=shapes-clip",
            "prompts=shapes-train",
            f"seed={seed}",
            f"epochs={self.epochs}",
            f"output_dir={output_dir}",
            f"sample.num_steps={self.num_steps}",
            f"sample.batch_size={batch}",
            f"sample.num_batches_per_epoch={self.samples_per_epoch // batch}",
            f"eval.every={self.eval_every}",
            f"eval.size={self.eval_size}",
            "eval.prompt_sets=[shapes-train, shapes-heldout]",
            "eval.rewards=[shapes-oracle]",
            "save_every=1000",
            "keep_checkpoints=1",
            "tensorboard=false",
            *self.extra,
        ]


def summarise(runs: list[dict], target_gain: float) -> dict:
    """Per variant: changes since each seed's base, queries to ``target_gain`` on the train oracle."""
    return seeded_runs.summarise(runs, list(CURVES.values()), TRAIN_ORACLE, target_gain)


def plot(summary: dict, path: Path) -> None:
    seeded_runs.plot_changes(
        summary,
        CURVES,
        path,
        "ShapesWorld, shapes-clip reward: change since the base model (mean over seeds, band = min..max)",
    )


def format_table(summary: dict) -> str:
    names = {
        "proxy": CURVES["proxy (train prompts)"],
        "train oracle": TRAIN_ORACLE,
        "held-out oracle": CURVES["oracle alignment, held-out prompts"],
    }
    lines = [
        (
            f"queries to target: reward queries until a seed's train-oracle alignment is up "
            f"{summary['target_gain']:+.3f} ('-' = not within the budget); changes are final minus base, "
            "mean ± std over seeds"
        ),
        f"{'variant':<19} {'queries to target':<20}"
        + "".join(f"{'Δ ' + n:>20}" for n in names)
        + f" {'s/run':>7}",
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
    runs, execution = seeded_runs.run_grid(
        {name: VARIANTS[name] for name in study.variants},
        study.seeds,
        study.overrides,
        list(CURVES.values()),
        jobs=jobs,
        work_dir=work_dir,
    )
    return {"study": asdict(study), **execution, "runs": runs, "summary": summarise(runs, study.target_gain)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--eval-size", type=int, default=64, help="images per evaluated prompt set")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (torch threads = cores / jobs)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override applied to every run",
    )
    parser.add_argument(
        "--output",
        default="results/sample_efficiency",
        help="folder for sample_efficiency.json and .png (default: %(default)s, under the current folder)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, 2 epochs of 8 samples, 5 steps: a smoke run"
    )
    parser.add_argument(
        "--from-json",
        metavar="PATH",
        help="re-summarise, re-plot and re-print a finished study's JSON without running it",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text("utf-8"))
        result["summary"] = summarise(result["runs"], result["study"]["target_gain"])
        Path(args.from_json).write_text(json.dumps(result, indent=1), "utf-8")
        plot(result["summary"], Path(args.from_json).with_suffix(".png"))
        print(format_table(result["summary"]))
        return 0
    study = Study(
        seeds=args.seeds,
        variants=args.variants,
        epochs=args.epochs,
        eval_every=args.eval_every,
        eval_size=args.eval_size,
        extra=args.set,
    )
    if args.quick:
        study = Study(
            seeds=args.seeds[:1],
            variants=args.variants,
            epochs=2,
            samples_per_epoch=8,
            eval_every=1,
            eval_size=8,
            num_steps=5,
            extra=["train.batch_size=4", *args.set],
        )
    result = run(study, jobs=args.jobs)
    output = Path(args.output) / "sample_efficiency.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1), "utf-8")
    plot(result["summary"], output.with_suffix(".png"))
    print(format_table(result["summary"]))
    print(
        f"wall time {result['wall_seconds']:.0f} s ({args.jobs} jobs); wrote {output} and {output.with_suffix('.png')}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
