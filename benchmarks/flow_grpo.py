"""Does GRPO on a flow model move ShapesWorld's ground truth where DDPO on the UNet model could not?

On equal CPU time per run, three arms are trained on the count prompts, each with the proxy
reward ``shapes-clip`` and with the exact oracle ``shapes-oracle`` as reward, 3 seeds each:

* ``grpo-flow``: GRPO (Flow-GRPO, Liu et al. 2025) on ``shapes-flow``, the Stable Diffusion 3-style
  model, through the rectified-flow SDE sampler (``diffalign.flow``) at noise level 0.7 with 10
  sampling steps in training and 20 in evaluation;
* ``grpo-unet``: GRPO on ``shapes`` (the UNet model) with its preset (``presets/grpo.yaml``);
* ``ddpo-unet``: DDPO on ``shapes`` with its defaults.

Every run trains until its training CPU time (sampling, rewarding, updating; measured with
``time.process_time`` in the run's own process, so evaluation and other processes do not count)
reaches the budget, and is evaluated with fixed noise (η = 0, 20 steps) on 64 count prompts
and 64 held-out prompts by the oracle and by ``shapes-clip`` at the base model and at four equally
spaced points of the budget. Curves are kept against reward queries and CPU seconds.

    python -m diffalign.benchmarks.flow_grpo                      # all arms, 3 seeds: ~70 min on 2 cores
    python -m diffalign.benchmarks.flow_grpo --arms grpo-flow --rewards oracle --seeds 0 --budget-minutes 2
    python -m diffalign.benchmarks.flow_grpo --quick              # smoke run

It writes ``flow_grpo.json`` (every curve and the summary) and ``flow_grpo.png`` into
``--output`` (default ``./results/flow_grpo``).
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

TRAIN_ORACLE = "eval/shapes-count/shapes-oracle"
HELDOUT_ORACLE = "eval/shapes-heldout/shapes-oracle"
TRAIN_CLIP = "eval/shapes-count/shapes-clip"
CURVES = {
    "oracle, count prompts (trained)": TRAIN_ORACLE,
    "oracle, held-out prompts": HELDOUT_ORACLE,
    "shapes-clip, count prompts": TRAIN_CLIP,
}
ARMS: dict[str, list[str]] = {
    # Flow-GRPO's recipe scaled to ShapesWorld: noise level a = 0.7 as the paper; fewer steps in
    # training (10) than in evaluation (20), their "denoising reduction"; every step stochastic (no
    # window: the UNet's [0, 7] window was found for its 20 DDIM steps). No KL, as the UNet arms:
    # at these budgets it only slows learning (presets/grpo.yaml, docs/methods/grpo.md).
    "grpo-flow": [
        "model=shapes-flow",
        "method=grpo",
        "sample.eta=0.7",
        "sample.num_steps=10",
        "sample.stochastic_steps=[]",
        "sample.shared_initial_noise=false",
    ],
    # The UNet model's tuned GRPO (presets/grpo.yaml: groups of 8 sharing x_T, window [0, 7] of 20 steps).
    "grpo-unet": ["model=shapes", "method=grpo"],
    # DDPO as diffalign's defaults have it (per-prompt statistics, 20 DDIM steps, η = 1).
    "ddpo-unet": ["model=shapes", "method=ddpo"],
}
REWARDS = {"clip": "shapes-clip", "oracle": "shapes-oracle"}


@dataclass
class Study:
    """The settings every run shares."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    rewards: list[str] = field(default_factory=lambda: list(REWARDS))
    budget_minutes: float = 6.0  # training CPU minutes per run
    evaluations: int = 4  # after the base model, at equal fractions of the budget
    eval_size: int = 64
    extra: list[str] = field(default_factory=list)

    def variants(self) -> dict[str, list[str]]:
        return {
            f"{arm}/{reward}": [*ARMS[arm], f"reward={REWARDS[reward]}"]
            for arm in self.arms
            for reward in self.rewards
        }

    def overrides(self, variant: str, seed: int, output_dir: Path) -> list[str]:
        return [
            *self.variants()[variant],
            "prompts=shapes-count",
            "exploration=none",
            f"seed={seed}",
            "epochs=100000",  # the CPU budget ends the run
            f"output_dir={output_dir}",
            "eval.every=100000",  # evaluated by the study at budget fractions instead
            "eval.num_steps=20",
            f"eval.size={self.eval_size}",
            "eval.prompt_sets=[shapes-count, shapes-heldout]",
            "eval.rewards=[shapes-oracle, shapes-clip]",
            "save_every=100000",
            "keep_checkpoints=1",
            "tensorboard=false",
            *self.extra,
        ]


def train_within_budget(args: tuple[str, int, list[str], float, int, int]) -> dict:
    """Train one (variant, seed) until its training CPU seconds reach the budget; runs in a worker."""
    variant, seed, overrides, budget_seconds, evaluations, threads = args
    import torch

    torch.set_num_threads(threads)
    from diffalign.config import load_config
    from diffalign.train import Trainer

    started = time.perf_counter()
    trainer = Trainer(load_config(None, overrides))
    points = [{"cpu_seconds": 0.0, "queries": 0, "epoch": 0, **trainer.evaluate()}]
    marks = [budget_seconds * (i + 1) / evaluations for i in range(evaluations)]
    cpu = 0.0
    while marks:
        before = time.process_time()
        record = trainer.run_epoch()
        cpu += time.process_time() - before
        if cpu >= marks[0]:
            while marks and cpu >= marks[0]:
                marks.pop(0)
            metrics = trainer.evaluator.run(trainer.pipe, trainer.epoch, trainer.accelerator)
            points.append(
                {"cpu_seconds": cpu, "queries": record["samples_seen"], "epoch": trainer.epoch, **metrics}
            )
    trainer.finish()
    return {
        "variant": variant,
        "seed": seed,
        "threads": threads,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": [point["cpu_seconds"] for point in points],
        "queries": [point["queries"] for point in points],
        "epochs": [point["epoch"] for point in points],
        "curves": {key: [point[key] for point in points] for key in CURVES.values()},
        "reward_mean": [r["reward_mean"] for r in trainer.history if "reward_mean" in r],
    }


def summarise(runs: list[dict]) -> dict:
    """Per variant: the change of every curve since each seed's base model, at every evaluation
    (mean, min, max over seeds) and at the end (mean, std, per seed), with queries and CPU minutes."""
    summary: dict = {}
    for variant in dict.fromkeys(run["variant"] for run in runs):
        group = [run for run in runs if run["variant"] == variant]
        common = min(len(run["queries"]) for run in group)
        entry: dict = {
            "seeds": [run["seed"] for run in group],
            "queries": np.mean([run["queries"][:common] for run in group], axis=0).tolist(),
            "cpu_minutes": (np.mean([run["cpu_seconds"][:common] for run in group], axis=0) / 60).tolist(),
            "base": {},
            "change": {},
            "final_change": {},
        }
        for key in CURVES.values():
            deltas = np.array(
                [np.array(run["curves"][key][:common]) - run["curves"][key][0] for run in group]
            )
            entry["base"][key] = float(np.mean([run["curves"][key][0] for run in group]))
            entry["change"][key] = {
                "mean": deltas.mean(0).tolist(),
                "min": deltas.min(0).tolist(),
                "max": deltas.max(0).tolist(),
            }
            entry["final_change"][key] = {
                "mean": float(deltas[:, -1].mean()),
                "std": float(deltas[:, -1].std()),
                "per_seed": deltas[:, -1].tolist(),
            }
        entry["final_queries"] = [run["queries"][-1] for run in group]
        summary[variant] = entry
    return summary


def plot(summary: dict, path: Path, budget_minutes: float) -> None:
    """Per reward (rows): oracle change on count and held-out prompts and the clip score's change
    against CPU minutes, and the count-prompt oracle change against reward queries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = list(dict.fromkeys(variant.split("/")[1] for variant in summary))
    arms = list(dict.fromkeys(variant.split("/")[0] for variant in summary))
    panels = [
        (TRAIN_ORACLE, "cpu_minutes", "oracle, count prompts (trained)", "training CPU minutes"),
        (HELDOUT_ORACLE, "cpu_minutes", "oracle, held-out prompts", "training CPU minutes"),
        (TRAIN_CLIP, "cpu_minutes", "shapes-clip score, count prompts", "training CPU minutes"),
        (TRAIN_ORACLE, "queries", "oracle, count prompts (trained)", "reward queries"),
    ]
    figure, axes = plt.subplots(
        len(rewards), len(panels), figsize=(4.6 * len(panels), 3.8 * len(rewards)), squeeze=False
    )
    for row, reward in enumerate(rewards):
        for column, (key, x, title, xlabel) in enumerate(panels):
            axis = axes[row][column]
            for index, arm in enumerate(arms):
                entry = summary.get(f"{arm}/{reward}")
                if entry is None:
                    continue
                change, colour = entry["change"][key], f"C{index}"
                axis.plot(entry[x], change["mean"], marker="o", markersize=3, color=colour, label=arm)
                axis.fill_between(entry[x], change["min"], change["max"], color=colour, alpha=0.12)
            axis.axhline(0, color="black", linewidth=0.6)
            if x == "cpu_minutes":
                axis.axvline(budget_minutes, color="grey", linestyle=":")
            axis.set_title(f"reward {REWARDS.get(reward, reward)}: {title}", fontsize=9)
            axis.set_xlabel(xlabel)
            axis.set_ylabel("change since base (mean, min..max of seeds)", fontsize=8)
            axis.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    figure.suptitle("GRPO on the flow model vs DDPO and GRPO on the UNet model, equal CPU time (ShapesWorld)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def format_table(result: dict) -> str:
    summary = result["summary"]
    lines = [
        (
            f"change since each seed's base model after {result['study']['budget_minutes']:g} training CPU minutes "
            "per run, mean ± std over seeds (per seed)"
        ),
        (
            f"{'variant':<18} {'Δ oracle, count (trained)':<40} {'Δ oracle, held-out':<20} {'Δ clip, count':<18} "
            f"{'queries':>8}  base oracle count/held-out"
        ),
    ]
    for variant, entry in summary.items():
        final = entry["final_change"]
        seeds = ", ".join(f"{value:+.3f}" for value in final[TRAIN_ORACLE]["per_seed"])
        count = f"{final[TRAIN_ORACLE]['mean']:+.3f} ± {final[TRAIN_ORACLE]['std']:.3f} ({seeds})"
        held = f"{final[HELDOUT_ORACLE]['mean']:+.3f} ± {final[HELDOUT_ORACLE]['std']:.3f}"
        clip = f"{final[TRAIN_CLIP]['mean']:+.3f} ± {final[TRAIN_CLIP]['std']:.3f}"
        queries = int(np.mean(entry["final_queries"]))
        base = f"{entry['base'][TRAIN_ORACLE]:.3f}/{entry['base'][HELDOUT_ORACLE]:.3f}"
        lines.append(f"{variant:<18} {count:<40} {held:<20} {clip:<18} {queries:>8}  {base}")
    return "\n".join(lines)


def run(study: Study, *, jobs: int = 2) -> dict:
    cores = os.cpu_count() or 1
    threads = max(1, cores // jobs)
    variants = study.variants()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        tasks = [
            (
                variant,
                seed,
                study.overrides(variant, seed, Path(folder) / f"{variant.replace('/', '-')}-seed{seed}"),
                study.budget_minutes * 60,
                study.evaluations,
                threads,
            )
            for variant in variants
            for seed in study.seeds
        ]
        if jobs == 1:
            runs = [train_within_budget(task) for task in tasks]
        else:
            import multiprocessing

            # Spawned workers: a forked child of a process that ran torch can deadlock in its thread pools.
            with ProcessPoolExecutor(
                max_workers=jobs, mp_context=multiprocessing.get_context("spawn")
            ) as pool:
                runs = list(pool.map(train_within_budget, tasks))
    return {
        "study": asdict(study),
        "jobs": jobs,
        "threads_per_run": threads,
        "cpu_count": cores,
        "wall_seconds": time.perf_counter() - started,
        "runs": runs,
        "summary": summarise(runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=list(REWARDS))
    parser.add_argument("--budget-minutes", type=float, default=6.0, help="training CPU minutes per run")
    parser.add_argument("--evaluations", type=int, default=4, help="evaluations after the base model")
    parser.add_argument("--eval-size", type=int, default=64, help="prompts per evaluated set")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each gets cores / jobs threads)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="an extra config override")
    parser.add_argument(
        "--output",
        default="results/flow_grpo",
        help="folder for flow_grpo.json and flow_grpo.png (default: %(default)s)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="one seed, 0.2 CPU minutes, 8 prompts, 2 evaluations"
    )
    args = parser.parse_args(argv)
    study = Study(
        seeds=args.seeds,
        arms=args.arms,
        rewards=args.rewards,
        budget_minutes=args.budget_minutes,
        evaluations=args.evaluations,
        eval_size=args.eval_size,
        extra=args.extra,
    )
    if args.quick:
        study.seeds, study.budget_minutes, study.evaluations, study.eval_size = [0], 0.2, 2, 8
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    result = run(study, jobs=args.jobs)
    (output / "flow_grpo.json").write_text(json.dumps(result, indent=2), "utf-8")
    plot(result["summary"], output / "flow_grpo.png", study.budget_minutes)
    print(format_table(result))
    print(f"wrote {output / 'flow_grpo.json'} and {output / 'flow_grpo.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
