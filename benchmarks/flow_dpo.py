"""Does Diffusion-DPO move a flow-matching model's ground truth, and does it matter whose images the
pairs are of? Flow-DPO on ``shapes-flow`` beside Diffusion-DPO on the UNet model ``shapes``.

Flow-DPO (Liu et al. 2025, arXiv 2501.13918) is Diffusion-DPO's loss on velocity errors at the
flow's interpolated x_s (``diffalign.optim.dpo``). Three arms train ``method: dpo`` with the DPO
preset's settings (β 2000, lr 3e-4, 8 pairs per step, Gaussian LoRA init) for the same number of
optimiser steps, 3 seeds each, and are evaluated with fixed noise along the way:

* ``unet`` — ``shapes`` on ``shapes-prefs``, pairs of its own images (the FiFA study's setting);
* ``flow-unet-pairs`` — ``shapes-flow`` on the same ``shapes-prefs``: another model's images, as
  public preference sets are (Pick-a-Pic's images come from several models);
* ``flow-own-pairs`` — ``shapes-flow`` on pairs of its own images: the ``shapes-prefs`` recipe with
  ``model=shapes-flow`` (``diffalign shapes prefs --model shapes-flow --output DIR``), built once
  into ``<output>/shapes-prefs-flow`` (about 2 minutes) unless ``--flow-data`` names a built one.

Ground truth is the exact oracle on train-split prompts (``shapes-train``, mostly relations, which
the pairs' prompts are drawn from), held-out prompts and count prompts (``shapes-count``, the flow
model's weakest skill on the train split), plus the training log's implicit accuracy: the share of
an epoch's pairs whose winner the model prefers more than the reference does.

Writes ``<output>/flow_dpo.json`` (every run's curves, the data sets' label composition, seconds),
``<output>/flow_dpo.png`` and prints a table.

    python -m diffalign.benchmarks.flow_dpo --jobs 2             # 3 arms x 3 seeds, ~25 min on 2 cores
    python -m diffalign.benchmarks.flow_dpo --quick              # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from diffalign.benchmarks import fifa_dpo, seeded_runs
from diffalign.benchmarks.fifa_dpo import composition

TRAIN_ORACLE = "eval/shapes-train/shapes-oracle"
HELDOUT_ORACLE = "eval/shapes-heldout/shapes-oracle"
COUNT_ORACLE = "eval/shapes-count/shapes-oracle"
ORACLE_KEYS = [TRAIN_ORACLE, HELDOUT_ORACLE, COUNT_ORACLE]
TRAINING_KEYS = ["implicit_accuracy", "reward_margin"]  # logged by each training epoch, no base value
ARMS = {
    "unet": ("shapes", "unet"),
    "flow-unet-pairs": ("shapes-flow", "unet"),
    "flow-own-pairs": ("shapes-flow", "flow"),
}


def flow_pairs(folder: Path, pairs: int) -> Path:
    """The on-policy preference set of ``shapes-flow``, built into ``folder`` unless it is there."""
    from diffalign.shapes import prefs

    if not (folder / "recipe.json").is_file():
        print(f"building {pairs} preference pairs of shapes-flow's images into {folder}", flush=True)
        prefs.build(folder, pairs=pairs, model="shapes-flow", progress=False)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=240, help="optimiser steps per run (every arm)")
    parser.add_argument(
        "--evaluations", type=int, default=4, help="evaluations along the run (plus the base)"
    )
    parser.add_argument("--flow-data", help="an already built shapes-flow preference set (a folder)")
    parser.add_argument(
        "--flow-pairs", type=int, help="pairs of the on-policy set when built (default 2400; 64 with --quick)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="extra config override for every run"
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (torch threads = cores / jobs)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 8 steps, 64 on-policy pairs")
    parser.add_argument("--output", default="results/flow_dpo", help="folder for the JSON and the figure")
    parser.add_argument("--from-json", help="summarise an earlier study's flow_dpo.json again (no training)")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if args.from_json:
        if (output / "flow_dpo.json").resolve() == Path(args.from_json).resolve():
            parser.error("--from-json would be overwritten by the summary: choose another --output")
        output.mkdir(parents=True, exist_ok=True)
        report(json.loads(Path(args.from_json).read_text()), output)
        return 0
    if args.quick:
        args.seeds, args.steps, args.evaluations = [0], 8, 2
    if args.flow_pairs is None:
        args.flow_pairs = 64 if args.quick else 2400
    if args.steps % args.evaluations:
        parser.error(f"--steps ({args.steps}) must be divisible by --evaluations ({args.evaluations})")

    from diffalign.config import load_config

    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = {"unet": "shapes-prefs"}
    if any(ARMS[arm][1] == "flow" for arm in args.arms):
        data["flow"] = str(
            Path(args.flow_data)
            if args.flow_data
            else flow_pairs(output / "shapes-prefs-flow", args.flow_pairs)
        )
    data_seconds = time.perf_counter() - started
    probe = load_config(None, ["method=dpo", *args.overrides])
    batch = probe.train.batch_size * probe.train.gradient_accumulation_steps
    steps_per_epoch = args.steps // args.evaluations  # one epoch between evaluations

    def overrides(arm: str, seed: int, folder: Path) -> list[str]:
        model, pairs = ARMS[arm]
        return [
            "method=dpo",
            f"model={model}",
            f"data={data[pairs]}",
            "eval.prompt_sets=[shapes-train, shapes-heldout, shapes-count]",
            "eval.rewards=[shapes-oracle]",
            *args.overrides,
            *fifa_dpo.evaluated_run(seed, args.evaluations, steps_per_epoch * batch, folder),
        ]

    runs, execution = seeded_runs.run_grid(
        {arm: [] for arm in args.arms},
        args.seeds,
        overrides,
        [*ORACLE_KEYS, *TRAINING_KEYS],
        jobs=args.jobs,
        threads=args.threads,
        work_dir=str(output),
    )
    result = {
        "settings": {**vars(args), "steps_per_evaluation": steps_per_epoch, "pairs_per_step": batch},
        "data": data,
        "data_seconds": data_seconds,
        "composition": {name: composition(spec) for name, spec in data.items()},
        "execution": execution,
        "runs": runs,
    }
    report(result, output)
    return 0


def report(result: dict, output: Path) -> dict:
    """Summarise the runs (oracle change since each seed's base; the training log's last implicit
    accuracy), write ``flow_dpo.json`` and ``flow_dpo.png`` into ``output``, print the tables."""
    runs = result["runs"]
    summary = seeded_runs.summarise(runs, ORACLE_KEYS, TRAIN_ORACLE, 0.0)
    for arm, entry in summary["variants"].items():
        group = [run for run in runs if run["variant"] == arm]
        entry["seeds"] = [run["seed"] for run in group]
        entry["train_seconds"] = [run["train_seconds"][-1] for run in group]
        entry["final_by_seed"] = {
            key: [run["curves"][key][-1] - run["curves"][key][0] for run in group] for key in entry["base"]
        }
        entry["training_log"] = {
            key: {
                "curve_mean": np.mean([run["curves"][key] for run in group], axis=0).tolist(),
                "final_mean": float(np.mean([run["curves"][key][-1] for run in group])),
                "final_std": float(np.std([run["curves"][key][-1] for run in group])),
            }
            for key in TRAINING_KEYS
            if all(run["curves"].get(key) for run in group)
        }
    result = {**result, "summary": summary}
    (output / "flow_dpo.json").write_text(json.dumps(result, indent=1, default=str))
    settings = result["settings"]
    seeded_runs.plot_changes(
        {**summary, "target_key": None},
        {
            "train-split oracle": TRAIN_ORACLE,
            "held-out oracle": HELDOUT_ORACLE,
            "count-prompt oracle": COUNT_ORACLE,
        },
        output / "flow_dpo.png",
        f"Diffusion-DPO on the UNet and the flow model: {len(settings['seeds'])} seeds, "
        f"{settings['steps']} steps of {settings['pairs_per_step']} pairs",
        xlabel="preference pairs seen",
    )
    print(table(summary))
    print(composition_table(result["composition"]))
    print(f"wrote {output / 'flow_dpo.json'} and {output / 'flow_dpo.png'}")
    return summary


def table(summary: dict) -> str:
    """Per arm: base oracle, final change (mean ± std over seeds), implicit accuracy, seconds."""
    lines = [
        (
            "| arm | base oracle train / held-out / count | Δ train (by seed) | Δ train | Δ held-out | Δ count "
            "| implicit accuracy, last epoch | train s |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, entry in summary["variants"].items():
        final, base = entry["final_change"], entry["base"]

        def cell(key: str, final: dict = final) -> str:
            return f"{final[key]['mean']:+.3f} ± {final[key]['std']:.3f}" if key in final else "–"

        seeds = " / ".join(f"{value:+.3f}" for value in entry["final_by_seed"].get(TRAIN_ORACLE, []))
        bases = " / ".join(f"{base[key]:.3f}" if key in base else "–" for key in ORACLE_KEYS)
        accuracy = entry["training_log"].get("implicit_accuracy")
        accuracy = f"{accuracy['final_mean']:.3f} ± {accuracy['final_std']:.3f}" if accuracy else "–"
        lines.append(
            f"| {arm} | {bases} | {seeds} | {cell(TRAIN_ORACLE)} | {cell(HELDOUT_ORACLE)} | {cell(COUNT_ORACLE)} "
            f"| {accuracy} | {np.mean(entry['train_seconds']):.0f} |"
        )
    return "\n".join(lines)


def composition_table(truth: dict) -> str:
    """Shares of each preference set's pairs by what the oracle says of their labels (by the model
    that drew them)."""
    return fifa_dpo.composition_table(
        {("shapes" if name == "unet" else "shapes-flow"): entry for name, entry in truth.items()}
    )


if __name__ == "__main__":
    raise SystemExit(main())
