"""Can policy gradients learn ShapesWorld's ground truth on a CPU budget? DDPO and GRPO variants,
trained with the exact oracle (``shapes-oracle``) as their reward on the count prompts.

The target (issue: policy gradients that learn): oracle alignment on the training prompts up
by at least +0.05 in each of 3 seeds within 30 CPU minutes per run. Every variant is one list
of config overrides on top of the shared settings below, so each figure comes with the command
that reproduces it:

    python -m diffalign.benchmarks.policy_gradient --output results/policy_gradient        # all, 3 seeds
    python -m diffalign.benchmarks.policy_gradient --variants grpo --seeds 0 --epochs 10   # one screen
    python -m diffalign.benchmarks.policy_gradient --quick                                   # smoke run

Each run is evaluated with fixed noise (DDIM η = 0, 20 steps) on 64 count prompts and 64
held-out prompts every ``--eval-every`` epochs; curves are kept against reward queries and
against training seconds (sampling, rewarding and updating; evaluation excluded). It writes
``policy_gradient.json`` (every curve, per-variant summary) and ``policy_gradient.png`` into
``--output`` (default ``./results/policy_gradient/``). trl's DDPOTrainer on the same problem is
run by ``benchmarks/peers/trl_ddpo.py`` in its own environment; ``--peer [NAME=]DIR`` adds its
metrics.jsonl files (one folder per seed) to the table and plot.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from diffalign.benchmarks import seeded_runs

TRAIN_ORACLE = "eval/shapes-count/shapes-oracle"
SEEDS_FOR_TARGET = 3
HELDOUT_ORACLE = "eval/shapes-heldout/shapes-oracle"
CURVES = {
    "oracle alignment, count prompts": TRAIN_ORACLE,
    "oracle alignment, held-out prompts": HELDOUT_ORACLE,
}
# Levers, each measured as a variant (docs/studies/policy-gradient.md).
VARIANTS: dict[str, list[str]] = {
    # DDPO as diffalign's defaults have it: per-prompt statistics, one optimiser step per 4 images (16 per epoch).
    "ddpo": ["method=ddpo"],
    # The same with ddpo-pytorch's and trl's LoRA initialisation (A ~ N(0, 1/r^2)): ~4x larger steps.
    "ddpo-gaussian": ["method=ddpo", "lora.init=gaussian"],
    # ... at a third of the learning rate: trl's default and DDPO's published rate for SD 1.5 LoRA
    # (3e-4). With Gaussian A, 1e-3 moves the weights ~4x faster than peft's init at the same rate.
    "ddpo-gaussian-lr3e-4": ["method=ddpo", "lora.init=gaussian", "train.learning_rate=3e-4"],
    # ... training a random quarter of each trajectory's steps instead of half: the update's cost
    # (about 60 % of an epoch) halves, the number of optimiser steps per epoch stays.
    "ddpo-gaussian-lr3e-4-tf25": [
        "method=ddpo",
        "lora.init=gaussian",
        "train.learning_rate=3e-4",
        "train.timestep_fraction=0.25",
    ],
    # ... with randomness and training confined to the first 8 of 20 steps, where ShapesWorld's
    # layouts are decided (MixGRPO's window, Li et al. 2025): the reward is credited to those steps only.
    "ddpo-window-0-7": [
        "method=ddpo",
        "lora.init=gaussian",
        "train.learning_rate=3e-4",
        "sample.stochastic_steps=[0, 7]",
    ],
    # ... as GRPO over groups of 8 sharing one x_T (DanceGRPO) with the same window: within a group
    # only the window's noise differs, so advantages credit exactly the steps that are trained.
    "grpo-window-shared-noise": [
        "method=grpo",
        "lora.init=gaussian",
        "train.learning_rate=3e-4",
        "sample.images_per_prompt=8",
        "sample.shared_initial_noise=true",
        "sample.stochastic_steps=[0, 7]",
    ],
    # The recipe (diffalign/presets/grpo.yaml): the above for 40 epochs, the run length fixed on seeds 1 and 2
    # before seed 0 reached it; longer runs can collapse (docs/studies/policy-gradient.md).
    "grpo-window-shared-noise-40": [
        "method=grpo",
        "lora.init=gaussian",
        "train.learning_rate=3e-4",
        "sample.images_per_prompt=8",
        "sample.shared_initial_noise=true",
        "sample.stochastic_steps=[0, 7]",
        "epochs=40",
    ],
    # ... with Flow-GRPO's KL to the reference (beta 0.04), against the collapse of long runs.
    "grpo-window-shared-noise-kl": [
        "method=grpo",
        "lora.init=gaussian",
        "train.learning_rate=3e-4",
        "sample.images_per_prompt=8",
        "sample.shared_initial_noise=true",
        "sample.stochastic_steps=[0, 7]",
        "grpo.kl_weight=0.04",
    ],
    # What the clip exists for: 4 passes over each epoch's samples.
    "ddpo-ppo4": ["method=ddpo", "lora.init=gaussian", "train.inner_epochs=4"],
    # Group-relative advantages over 8 images per prompt (Flow-GRPO, DanceGRPO).
    "grpo": ["method=grpo", "lora.init=gaussian", "sample.images_per_prompt=8"],
    # ... from one shared x_T per group (DanceGRPO), so advantages credit only the sampled steps.
    "grpo-shared-noise": [
        "method=grpo",
        "lora.init=gaussian",
        "sample.images_per_prompt=8",
        "sample.shared_initial_noise=true",
    ],
    # ... sampled with 10 steps in training (evaluated with 20): twice the queries per CPU second.
    "grpo-10-steps": [
        "method=grpo",
        "lora.init=gaussian",
        "sample.images_per_prompt=8",
        "sample.num_steps=10",
        "eval.num_steps=20",
    ],
}


@dataclass
class Study:
    """The settings every run shares."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    epochs: int = 60
    samples_per_epoch: int = 64
    eval_every: int = 10
    eval_size: int = 64
    learning_rate: float = 1e-3
    target_gain: float = 0.05
    budget_minutes: float = 30.0  # CPU minutes per run: training seconds x torch threads, evaluation excluded
    extra: list[str] = field(default_factory=list)

    def overrides(self, variant: str, seed: int, output_dir: Path) -> list[str]:
        batch = min(16, self.samples_per_epoch)
        return [
            "model=shapes",
            "reward=shapes-oracle",
            "prompts=shapes-count",
            "exploration=none",
            f"seed={seed}",
            f"epochs={self.epochs}",
            f"output_dir={output_dir}",
            "sample.num_steps=20",
            f"sample.batch_size={batch}",
            f"sample.num_batches_per_epoch={self.samples_per_epoch // batch}",
            f"train.learning_rate={self.learning_rate}",
            f"eval.every={self.eval_every}",
            f"eval.size={self.eval_size}",
            "eval.prompt_sets=[shapes-count, shapes-heldout]",
            "eval.rewards=[]",
            "save_every=1000",
            "keep_checkpoints=1",
            "tensorboard=false",
            *VARIANTS[variant],
            *self.extra,
        ]


def read_peers(specs: list[str] | None) -> list[dict]:
    """``[NAME=]DIR`` items (NAME defaults to trl-ddpo) read with ``read_peer``."""
    runs = []
    for spec in specs or []:
        name, _, folder = spec.rpartition("=")
        runs += read_peer(Path(folder), name or "trl-ddpo")
    return runs


def read_peer(folder: Path, name: str = "trl-ddpo") -> list[dict]:
    """Runs of ``benchmarks/peers/trl_ddpo.py`` (one sub-folder with metrics.jsonl per seed) as study runs."""
    runs = []
    for metrics in sorted(Path(folder).glob("*/metrics.jsonl")):
        history = [json.loads(line) for line in metrics.read_text("utf-8").splitlines() if line.strip()]
        settings = metrics.parent / "trl_settings.json"
        threads = json.loads(settings.read_text("utf-8")).get("torch_threads") if settings.is_file() else None
        evaluated = [record for record in history if TRAIN_ORACLE in record]
        elapsed = np.cumsum([record.get("seconds", 0.0) for record in history])
        runs.append(
            {
                "variant": name,
                "seed": history[-1].get("seed", len(runs)),
                "threads": threads,
                "seconds": float(elapsed[-1]),
                "train_seconds": [float(elapsed[history.index(record)]) for record in evaluated],
                "queries": [record["samples_seen"] for record in evaluated],
                "curves": {
                    key: [record[key] for record in evaluated if key in record] for key in CURVES.values()
                },
            }
        )
    return runs


def at_budget(run: dict, budget_minutes: float) -> dict | None:
    """The count-prompt change at the run's last evaluation within ``budget_minutes`` CPU minutes
    (training seconds x torch threads), with the CPU minutes and queries it took; None when the
    run's threads are unknown or its first training evaluation is already over budget."""
    if not run.get("threads"):
        return None
    curve = run["curves"][TRAIN_ORACLE]
    inside = [
        i for i, seconds in enumerate(run["train_seconds"]) if seconds * run["threads"] <= budget_minutes * 60
    ]
    if len(inside) < 2:
        return None
    last = inside[-1]
    return {
        "change": curve[last] - curve[0],
        "cpu_minutes": run["train_seconds"][last] * run["threads"] / 60,
        "queries": run["queries"][last],
    }


def summarise(runs: list[dict], target_gain: float, budget_minutes: float = 30.0) -> dict:
    summary = seeded_runs.summarise(runs, list(CURVES.values()), TRAIN_ORACLE, target_gain)
    summary["budget_minutes"] = budget_minutes
    for variant, entry in summary["variants"].items():
        readings = [at_budget(run, budget_minutes) for run in runs if run["variant"] == variant]
        entry["at_budget"] = readings
        known = [r for r in readings if r is not None]
        # The target is about 3 seeds: fewer cannot meet it, however well they do.
        entry["target_met_at_budget"] = (
            len(known) >= SEEDS_FOR_TARGET
            and len(known) == len(readings)
            and all(r["change"] >= target_gain for r in known)
        )
    return summary


def plot(runs: list[dict], summary: dict, path: Path) -> None:
    """Count-prompt oracle change against reward queries (mean, min..max band) and against
    training seconds (each run), and the held-out change against queries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for index, (variant, entry) in enumerate(summary["variants"].items()):
        colour = f"C{index}"
        for axis, key in ((axes[0], TRAIN_ORACLE), (axes[2], HELDOUT_ORACLE)):
            change = entry["change"][key]
            axis.plot(entry["queries"], change["mean"], marker="o", markersize=3, color=colour, label=variant)
            axis.fill_between(entry["queries"], change["min"], change["max"], color=colour, alpha=0.12)
        for run in (r for r in runs if r["variant"] == variant):
            curve = np.array(run["curves"][TRAIN_ORACLE])
            axes[1].plot(
                np.array(run["train_seconds"])
                * (run.get("threads") or 1)
                / 60,  # CPU minutes: seconds x threads
                curve - curve[0],
                color=colour,
                alpha=0.7,
                label=variant if run is next(r for r in runs if r["variant"] == variant) else None,
            )
    for axis, title, xlabel in (
        (axes[0], "oracle alignment, count prompts", "reward queries"),
        (axes[1], "oracle alignment, count prompts (each seed)", "training CPU minutes"),
        (axes[2], "oracle alignment, held-out prompts", "reward queries"),
    ):
        axis.axhline(0, color="black", linewidth=0.6)
        axis.set_title(f"{title}: change", fontsize=10)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
    for axis in axes[:2]:
        axis.axhline(summary["target_gain"], color="grey", linestyle=":")
    axes[1].axvline(summary.get("budget_minutes", 30), color="grey", linestyle=":")
    axes[0].legend(fontsize=8)
    figure.suptitle("Policy gradients with the exact oracle as reward, ShapesWorld count prompts")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def format_table(summary: dict) -> str:
    lines = [
        (
            "changes since each seed's base model, final, mean ± std over seeds (per seed); "
            f"target: count-prompt oracle {summary['target_gain']:+.2f} in every seed"
        ),
        (
            f"{'variant':<18} {'Δ oracle, count prompts':<44} {'Δ oracle, held-out':<18} "
            f"{'queries':>8} {'min/run':>8}  Δ at {summary.get('budget_minutes', 30):g} CPU min (per seed)"
        ),
    ]
    for variant, entry in summary["variants"].items():
        final = entry["final_change"]
        seeds = ", ".join(f"{value:+.3f}" for value in entry.get("final_per_seed", []))
        count = f"{final[TRAIN_ORACLE]['mean']:+.3f} ± {final[TRAIN_ORACLE]['std']:.3f} ({seeds})"
        held_out = f"{final[HELDOUT_ORACLE]['mean']:+.3f} ± {final[HELDOUT_ORACLE]['std']:.3f}"
        budget = ", ".join(
            "?" if r is None else f"{r['change']:+.3f} ({r['queries']} q, {r['cpu_minutes']:.0f} min)"
            for r in entry.get("at_budget", [])
        )
        met = " — target met" if entry.get("target_met_at_budget") else ""
        lines.append(
            f"{variant:<18} {count:<44} {held_out:<18} "
            f"{entry['queries'][-1]:>8} {entry['seconds_mean'] / 60:>8.1f}  {budget}{met}"
        )
    return "\n".join(lines)


def _per_seed(runs: list[dict], summary: dict) -> None:
    for variant, entry in summary["variants"].items():
        entry["final_per_seed"] = [
            run["curves"][TRAIN_ORACLE][-1] - run["curves"][TRAIN_ORACLE][0]
            for run in runs
            if run["variant"] == variant
        ]


def run(study: Study, *, jobs: int = 2, threads: int | None = None, peer: list[str] | None = None) -> dict:
    runs, execution = seeded_runs.run_grid(
        {name: VARIANTS[name] for name in study.variants},
        study.seeds,
        study.overrides,
        list(CURVES.values()),
        jobs=jobs,
        threads=threads,
    )
    runs += read_peers(peer)
    summary = summarise(runs, study.target_gain, study.budget_minutes)
    _per_seed(runs, summary)
    return {"study": asdict(study), **execution, "runs": runs, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--samples-per-epoch", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (torch threads = cores / jobs)")
    parser.add_argument("--threads", type=int, help="torch threads per run instead of cores / jobs")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=30.0,
        help="CPU minutes per run (training seconds x threads) at which the target is read",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every run"
    )
    parser.add_argument(
        "--peer",
        nargs="+",
        metavar="[NAME=]DIR",
        help="folders of trl_ddpo.py runs (one sub-folder per seed), each shown as NAME (trl-ddpo)",
    )
    parser.add_argument(
        "--output", default="results/policy_gradient", help="folder for the JSON and the plot"
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs of 8 images, small evaluation")
    parser.add_argument("--from-json", metavar="PATH", help="re-summarise and re-plot a finished study")
    parser.add_argument(
        "--from-runs",
        nargs="+",
        metavar="VARIANT=RUN.json",
        help="summarise runs trained one by one (each the JSON of seeded_runs.train_one, e.g. "
        "from separate machines or sessions) under the variant named before '='",
    )
    args = parser.parse_args(argv)
    output = Path(args.output)
    if args.from_runs:
        runs = []
        for item in args.from_runs:
            variant, _, path = item.partition("=")
            if variant not in VARIANTS or not path:
                parser.error(
                    f"--from-runs takes VARIANT=RUN.json with a variant of {', '.join(VARIANTS)}; got {item!r}"
                )
            runs.append({**json.loads(Path(path).read_text("utf-8")), "variant": variant})
        runs += read_peers(args.peer)
        study = Study(
            seeds=sorted({r["seed"] for r in runs}),
            variants=list(dict.fromkeys(r["variant"] for r in runs)),
            budget_minutes=args.budget_minutes,
            extra=args.set,
        )
        result = {
            "study": asdict(study),
            "runs": runs,
            "summary": summarise(runs, study.target_gain, args.budget_minutes),
        }
        _per_seed(runs, result["summary"])
    elif args.from_json:
        result = json.loads(Path(args.from_json).read_text("utf-8"))
        if args.peer:
            peers = read_peers(args.peer)
            names = {r["variant"] for r in peers}
            result["runs"] = [r for r in result["runs"] if r["variant"] not in names] + peers
        result["summary"] = summarise(result["runs"], result["study"]["target_gain"], args.budget_minutes)
        _per_seed(result["runs"], result["summary"])
    else:
        study = Study(
            seeds=args.seeds,
            variants=args.variants,
            epochs=args.epochs,
            samples_per_epoch=args.samples_per_epoch,
            eval_every=args.eval_every,
            eval_size=args.eval_size,
            learning_rate=args.learning_rate,
            budget_minutes=args.budget_minutes,
            extra=args.set,
        )
        if args.quick:
            study = Study(
                seeds=args.seeds[:1],
                variants=args.variants,
                epochs=2,
                samples_per_epoch=16,
                eval_every=1,
                eval_size=8,
                extra=["sample.num_steps=4", "eval.num_steps=4", *args.set],
            )
        result = run(study, jobs=args.jobs, threads=args.threads, peer=args.peer)
    output.mkdir(parents=True, exist_ok=True)
    (output / "policy_gradient.json").write_text(json.dumps(result, indent=1), "utf-8")
    plot(result["runs"], result["summary"], output / "policy_gradient.png")
    print(format_table(result["summary"]))
    print(f"wrote {output / 'policy_gradient.json'} and {output / 'policy_gradient.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
