"""Reward over-optimization on ShapesWorld: training on the raw ``shapes-clip`` proxy against
training on TextNorm over it (Kim et al., ICLR 2024), with DDPO and with AlignProp, several seeds.

ShapesWorld's exact detector measures what people asked for, so the study can watch what a
real benchmark cannot: whether the oracle alignment follows the proxy while the proxy climbs.
The paper's claim is that a poorly calibrated reward is over-optimized (proxy up, true
alignment flat or down) and that TextNorm's confidence calibration reduces it. Both variants
are evaluated with the *raw* proxy and the oracle on train and held-out prompts, with fixed
noise, at the same reward-query counts. Beside the curves, both rewards are scored on
shapes-TIA (``tia2.py``): how well each ranks images by their true alignment.

DDPO is the method the paper studies; on a CPU budget its proxy barely moves on ShapesWorld
(README, issue 3), so the study also runs AlignProp, whose proxy does climb within the budget,
to show what happens to the oracle while a proxy is pushed up.

Outputs, in ``--output`` (default ``./results/overoptimization/``): ``overoptimization.json``
(every curve, summaries, the AUROC table) and ``overoptimization.png`` (change since the base
model against reward queries).

    python -m diffalign.benchmarks.overoptimization            # 2 methods x 2 rewards x 3 seeds
    python -m diffalign.benchmarks.overoptimization --quick    # smoke run, about a minute
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffalign.benchmarks import seeded_runs

RAW, CALIBRATED = "shapes-clip", "textnorm(shapes-clip)"
PROMPTS = "shapes-count"
# Per method, the settings under which its proxy moves within a CPU budget. DDPO: 64 images per
# epoch in groups of 8 per prompt, two optimizer steps of 32 images each at lr 3e-3 (with the
# default 32 images and 4-image steps its curves stay flat); AlignProp: its preset.
METHODS: dict[str, list[str]] = {
    "ddpo": [
        "sample.batch_size=16",
        "sample.num_batches_per_epoch=4",
        "sample.images_per_prompt=8",
        "train.batch_size=16",
        "train.gradient_accumulation_steps=2",
        "train.learning_rate=3e-3",
    ],
    "alignprop": [],
}
TRAIN_ORACLE = f"eval/{PROMPTS}/shapes-oracle"
CURVES = {
    "raw proxy shapes-clip (train prompts)": f"eval/{PROMPTS}/shapes-clip",
    "TextNorm proxy (train prompts)": f"eval/{PROMPTS}/{CALIBRATED}",
    "oracle alignment, train prompts": TRAIN_ORACLE,
    "oracle alignment, held-out prompts": "eval/shapes-heldout/shapes-oracle",
}
# Each run is evaluated with the raw proxy and the oracle whatever it trains on, so the two
# variants are compared on the same scale; the training reward is always scored too.
EXTRA_EVAL_REWARDS = {RAW: "[shapes-oracle]", CALIBRATED: "[shapes-clip, shapes-oracle]"}


@dataclass
class Study:
    """Settings shared by every run: each method's default job, longer, with each reward."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    rewards: list[str] = field(default_factory=lambda: [RAW, CALIBRATED])
    epochs: int = 30
    eval_every: int = 5
    num_steps: int = 10
    eval_size: int = 64
    target_gain: float = 0.03
    extra: list[str] = field(default_factory=list)

    def variants(self) -> dict[str, tuple[str, str]]:
        """``"method · reward"`` -> (method, reward)."""
        return {
            f"{method} · {reward}": (method, reward) for method in self.methods for reward in self.rewards
        }

    def overrides(self, variant: str, seed: int, output_dir: Path) -> list[str]:
        method, reward = self.variants()[variant]
        return [
            f"method={method}",
            *METHODS[method],
            f"sample.num_steps={self.num_steps}",
            "model=shapes",
            f"reward={reward}",
            f"prompts={PROMPTS}",
            f"seed={seed}",
            f"epochs={self.epochs}",
            f"output_dir={output_dir}",
            f"eval.every={self.eval_every}",
            f"eval.size={self.eval_size}",
            f"eval.prompt_sets=[{PROMPTS}, shapes-heldout]",
            f"eval.rewards={EXTRA_EVAL_REWARDS[reward]}",
            "save_every=1000",
            "keep_checkpoints=1",
            "tensorboard=false",
            *self.extra,
        ]


def auroc_table(reward_names: list[str], data: str | None, progress: bool) -> dict[str, dict]:
    """Mean per-prompt AUROC (and AUPRC) of each reward per shapes-TIA subset."""
    from diffalign.benchmarks import tia2

    dataset = tia2.load(data or "shapes-tia", progress=progress)
    table = {}
    for name in reward_names:
        results = tia2.evaluate(name, dataset, progress=progress)
        table[name] = {
            subset: {"auroc": metrics["auroc"], "auprc": metrics["auprc"]}
            for subset, metrics in results.items()
        }
    return table


def run(study: Study, *, jobs: int = 2, tia_data: str | None = None, progress: bool = True) -> dict:
    """Train every (reward, seed), summarise, and score both rewards on shapes-TIA."""
    keys = list(CURVES.values())
    # The first key must be logged by every run: the train-oracle curve is.
    keys.remove(TRAIN_ORACLE)
    keys.insert(0, TRAIN_ORACLE)
    runs, execution = seeded_runs.run_grid(study.variants(), study.seeds, study.overrides, keys, jobs=jobs)
    return {
        "study": asdict(study),
        **execution,
        "runs": runs,
        "summary": seeded_runs.summarise(runs, keys, TRAIN_ORACLE, study.target_gain),
        "auroc": auroc_table(study.rewards, tia_data, progress),
    }


def format_table(result: dict) -> str:
    summary = result["summary"]
    lines = ["final change since the base model, mean ± std over seeds"]
    header = f"{'method · trained on':<32}" + "".join(f"{label[:26]:>30}" for label in CURVES)
    lines.append(header)
    for variant, entry in summary["variants"].items():
        cells = []
        for key in CURVES.values():
            change = entry["final_change"].get(key)
            cells.append(f"{change['mean']:>+21.3f} ± {change['std']:.3f}" if change else f"{'-':>30}")
        lines.append(f"{variant:<32}" + "".join(cells))
    lines.append("")
    lines.append("shapes-TIA: mean per-prompt AUROC / AUPRC")
    subsets = list(next(iter(result["auroc"].values())))
    lines.append(f"{'reward':<24}" + "".join(f"{subset:>24}" for subset in subsets))
    for name, per_subset in result["auroc"].items():
        lines.append(
            f"{name:<24}"
            + "".join(f"{per_subset[s]['auroc']:>15.3f} / {per_subset[s]['auprc']:.3f}" for s in subsets)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-size", type=int, default=64, help="images per evaluated prompt set")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (torch threads = cores / jobs)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override applied to every run",
    )
    parser.add_argument("--tia-data", help="a TIA2-format dataset for the AUROC table (default: shapes-TIA)")
    parser.add_argument(
        "--output",
        default="results/overoptimization",
        help="folder for overoptimization.json and .png (default: %(default)s, under the current folder)",
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 short epochs: a smoke run")
    parser.add_argument("--from-json", metavar="PATH", help="re-plot and re-print a finished study")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text("utf-8"))
    else:
        study = Study(
            seeds=args.seeds,
            methods=args.methods,
            epochs=args.epochs,
            eval_every=args.eval_every,
            eval_size=args.eval_size,
            extra=args.set,
        )
        if args.quick:
            study = Study(
                seeds=args.seeds[:1],
                methods=args.methods,
                epochs=2,
                eval_every=1,
                eval_size=8,
                num_steps=4,
                extra=[
                    "sample.batch_size=8",
                    "sample.num_batches_per_epoch=1",
                    "sample.images_per_prompt=4",
                    "train.batch_size=8",
                    "train.gradient_accumulation_steps=1",
                    *args.set,
                ],
            )
        result = run(study, jobs=args.jobs, tia_data=args.tia_data, progress=not args.no_progress)
        output = Path(args.output) / "overoptimization.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=1), "utf-8")
        args.from_json = str(output)
    output = Path(args.from_json)
    seeded_runs.plot_changes(
        result["summary"],
        CURVES,
        output.with_suffix(".png"),
        f"{PROMPTS}: trained on raw shapes-clip vs TextNorm (change since base; mean over seeds, band = min..max)",
    )
    print(format_table(result))
    print(f"wrote {output} and {output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
