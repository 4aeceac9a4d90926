"""Shared machinery of the training studies: many seeded ``diffalign train`` runs, side by side.

A study is a set of variants (each a list of config overrides) trained with several seeds.
Each run is evaluated with fixed noise at the same reward-query counts; the study compares
each curve's *change since that seed's base model* (each seed evaluates its own prompts and
noise, so base values differ between seeds). ``benchmarks/sample_efficiency.py`` and
``benchmarks/overoptimization.py`` are two such studies.

Runs execute ``jobs`` at a time in worker processes, each with ``cores / jobs`` torch threads:
on 2 cores two single-threaded runs finish sooner than one two-threaded run after the other,
because torch's own two threads scale poorly on these small models.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def train_one(args: tuple[str, int, list[str], list[str], int]) -> dict:
    """Train one (variant, seed) with ``overrides`` and return its evaluated curves; runs in a worker."""
    variant, seed, overrides, keys, threads = args
    import torch

    torch.set_num_threads(threads)
    from diffalign.config import load_config
    from diffalign.train import train

    started = time.perf_counter()
    history = train(load_config(None, overrides), progress=False).history
    evaluated = [record for record in history if keys[0] in record]
    # Training seconds (sampling, rewarding, updates; not evaluation) up to each evaluated epoch.
    elapsed = np.cumsum([record.get("seconds", 0.0) for record in history])
    return {
        "variant": variant,
        "seed": seed,
        "threads": threads,
        "seconds": time.perf_counter() - started,
        "train_seconds": [float(elapsed[history.index(record)]) for record in evaluated],
        "queries": [record["samples_seen"] for record in evaluated],
        "curves": {key: [record[key] for record in evaluated if key in record] for key in keys},
    }


def run_grid(
    variants: dict[str, list[str]],
    seeds: list[int],
    overrides: Callable[[str, int, Path], list[str]],
    keys: list[str],
    *,
    jobs: int = 2,
    work_dir: str | None = None,
    threads: int | None = None,
) -> tuple[list[dict], dict]:
    """Train every (variant, seed); ``overrides(variant, seed, output_dir)`` gives a run's config.

    ``threads`` fixes each run's torch threads (default: cores / jobs). Returns the runs (in
    variant-then-seed order) and how they were executed.
    """
    cores = os.cpu_count() or 1
    threads = threads or max(1, cores // jobs)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work_dir) as folder:
        tasks = [
            (
                variant,
                seed,
                overrides(variant, seed, Path(folder) / f"{_slug(variant)}-seed{seed}"),
                keys,
                threads,
            )
            for variant in variants
            for seed in seeds
        ]
        if jobs == 1:
            runs = [train_one(task) for task in tasks]
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                runs = list(pool.map(train_one, tasks))
    execution = {
        "jobs": jobs,
        "threads_per_run": threads,
        "cpu_count": cores,
        "wall_seconds": time.perf_counter() - started,
    }
    return runs, execution


def queries_to_reach(queries: list[int], values: list[float], target: float) -> int | None:
    """The first evaluated query count at which ``values`` reaches ``target`` (None if never)."""
    for count, value in zip(queries, values):
        if value >= target:
            return count
    return None


def summarise(runs: list[dict], keys: list[str], target_key: str, target_gain: float) -> dict:
    """Per variant: mean/min/max of each curve's change since that seed's base, the queries each
    seed needed to raise ``target_key`` by ``target_gain``, final changes, seconds per run.

    A curve a variant does not log (e.g. a TextNorm score in a raw-reward run) is left out. When
    a variant's seeds ran for different lengths (one stopped early), every seed is summarised over
    the evaluations they all have, and ``evaluations`` says how many that is.
    """
    summary = {"target_gain": target_gain, "target_key": target_key, "variants": {}}
    for variant in dict.fromkeys(run["variant"] for run in runs):
        group = [run for run in runs if run["variant"] == variant]
        present = [key for key in keys if all(run["curves"].get(key) for run in group)]
        common = min(
            [len(run["queries"]) for run in group]
            + [len(run["curves"][key]) for run in group for key in present]
        )
        deltas = {
            key: np.array([np.array(run["curves"][key][:common]) - run["curves"][key][0] for run in group])
            for key in present
        }
        summary["variants"][variant] = {
            "evaluations": common,
            "queries": group[0]["queries"][:common],
            "base": {key: float(np.mean([run["curves"][key][0] for run in group])) for key in present},
            "change": {
                key: {"mean": d.mean(0).tolist(), "min": d.min(0).tolist(), "max": d.max(0).tolist()}
                for key, d in deltas.items()
            },
            "queries_to_target": [
                queries_to_reach(run["queries"], deltas[target_key][i].tolist(), target_gain)
                for i, run in enumerate(group)
            ]
            if target_key in deltas
            else [],
            "final_change": {
                key: {"mean": float(d[:, -1].mean()), "std": float(d[:, -1].std())}
                for key, d in deltas.items()
            },
            "seconds_mean": float(np.mean([run["seconds"] for run in group])),
        }
    return summary


def plot_changes(
    summary: dict, curves: dict[str, str], path: Path, title: str, *, xlabel: str = "reward queries"
) -> None:
    """One panel per curve: change since the base against reward queries, mean and min..max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for axis, (label, key) in zip(axes[0], curves.items()):
        # One colour per variant in every panel, also where a variant lacks a curve.
        for index, (variant, entry) in enumerate(summary["variants"].items()):
            if key not in entry["change"]:
                continue
            change, queries, colour = entry["change"][key], entry["queries"], f"C{index}"
            axis.plot(queries, change["mean"], marker="o", markersize=3, label=variant, color=colour)
            axis.fill_between(queries, change["min"], change["max"], color=colour, alpha=0.12)
        if key == summary["target_key"]:
            axis.axhline(summary["target_gain"], color="grey", linestyle=":", label="target")
        axis.axhline(0, color="black", linewidth=0.6)
        axis.set_title(f"{label}: change", fontsize=10)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-+" else "_" for ch in name)
