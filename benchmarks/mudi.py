"""Does MuDI keep two personalised subjects apart where DreamBooth and Cut-Mix mix them? Measured on
ShapesWorld's marked subjects, whose identities and mixing the exact detector reads.

MuDI (Jang et al., NeurIPS 2024, arXiv 2404.04243) reports that Seg-Mix training plus its
mean-shifted initialisation roughly doubles multi-subject success over DreamBooth and Cut-Mix on
similar subjects. Here each subject pair is trained with every mode of ``diffalign personalize``
(same steps, learning rate, LoRA, prior preservation and seed), and each trained LoRA is sampled
from the same noise for the same prompts:

* ``dreambooth`` — DreamBooth-LoRA on both subjects (``mode: dreambooth``);
* ``cutmix`` — Cut-Mix compositions (``mode: cutmix``);
* ``mudi-no-init`` — Seg-Mix (``mode: segmix``), sampled from plain Gaussian noise;
* ``mudi`` — Seg-Mix with the mean-shifted initial noise (γ = ``--gamma``), the paper's full method.

Every arm is also sampled with the mean shift (``<arm>+init`` in the JSON), to show what the
initialisation does on its own. Pairs: ``similar-k`` (same shape and body colour, different
marking) and ``dissimilar-k`` (nothing shared); seed s trains pair k = s + 1 of each kind by
default, so the spread over seeds is a spread over pairs too (``--pairs`` names them).

Per arm, over the pair's multi-subject prompts (both orders, with and without "a photo of") ×
``--images`` noises:

* ``success`` — share of images where each subject is detected exactly once and no object mixes
  them (exact: every trait read by ``shapes.identities``);
* ``mixed`` — share of images with an object carrying traits of both subjects;
* ``dnc`` — mean Detect-and-Compare (``shapes-exact``: the paper's formula on exact similarities);
* ``fidelity`` — share of single-subject images ("a photo of zog circle") showing exactly that subject;
* CPU seconds of training (process time, all threads) and wall seconds.

Writes ``<output>/mudi.json``, ``<output>/mudi.png`` (success, mixing and fidelity per arm and kind,
mean and min..max over seeds), ``<output>/grid-<pair>.png`` (references, then each arm's
generations for the same prompts and noise) and prints the table.

    python -m diffalign.benchmarks.mudi --output benchmarks/results/mudi --jobs 2
    python -m diffalign.benchmarks.mudi --quick --output /tmp/mudi-quick
    python -m diffalign.benchmarks.mudi --model shapes-flow --output results/mudi-flow   # the SD3-style model
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

MODES = {"dreambooth": "dreambooth", "cutmix": "cutmix", "mudi-no-init": "segmix"}
ARMS = ("dreambooth", "cutmix", "mudi-no-init", "mudi")
# The ShapesWorld recipe every arm trains with (before the user's --set): the personalize defaults
# are diffusers' DreamBooth-LoRA settings for SD 1.5 (rank 4 on attention, lr 1e-4, 400 steps), under
# which the 4.2M-parameter UNet learns no marking. Rank 16 on attention, feed-forward and convolution
# layers at lr 1e-3 for 2000 steps reads each subject back in 94-100 % of single-subject samples
# (pair similar-1, seed 7, not a study seed; docs/studies/mudi.md).
SHAPES_RECIPE = (
    "lora.rank=16",
    "lora.alpha=16",
    "lora.target_modules=[to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2]",
    "learning_rate=1e-3",
)
KINDS = ("similar", "dissimilar")
METRICS = ("success", "mixed", "dnc", "all_present", "fidelity")


def subject_images(pair: str):
    """The pair's subjects as ``SubjectImages`` (read from the subject set's cached folders)."""
    from diffalign.personalize import load_personalize_config, resolve_subjects
    from diffalign.subjects import load_subjects

    config = load_personalize_config(None, [f"subject_set=shapes-{pair}"])
    return load_subjects(resolve_subjects(config))


def study_pipeline(lora: Path | None, model: str = "shapes"):
    """The shipped ``model`` (``shapes`` or ``shapes-flow``) drawing with ``shapes-vae-marked``, with
    the run's LoRA when given."""
    from diffalign import pipeline

    pipe = pipeline.load(model)
    pipeline.swap_vae(pipe, "shapes-vae-marked", model)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


def noise(pipe, subjects, count: int, seed: int, gamma: float):
    """``[count, C, h, w]`` initial latents: image i from its own generator (seed, i), so every arm
    (and γ = 0 against γ > 0) starts from the same ε; the mean shift adds the subjects' layout."""
    import torch

    from diffalign import mudi

    latents = []
    for index in range(count):
        generator = torch.Generator().manual_seed(1_000_003 * seed + index)
        latents.append(mudi.mean_shifted_latents(pipe, subjects, gamma=gamma, generator=generator))
    return torch.cat(latents)


def evaluate(pipe, pair: str, subjects, *, seed: int, gamma: float, images: int, steps: int, guidance: float):
    """Sample the pair's multi-subject and single-subject prompts and score them exactly."""
    import torch

    from diffalign.sampling import sample
    from diffalign.shapes import identities
    from diffalign.shapes.dnc import ShapesDnC

    looks = identities.pair(pair)
    together = identities.pair_prompts(pair)
    alone = [identities.prompt([look]) for look in looks]
    prompts = [p for p in together for _ in range(images)]
    latents = torch.cat([noise(pipe, subjects, images, seed, gamma) for _ in together])
    drawn = sample(pipe, prompts, num_steps=steps, guidance_scale=guidance, eta=0.0, latents=latents).images
    results = ShapesDnC()(drawn.float().cpu(), subjects)
    single_prompts = [p for p in alone for _ in range(images)]
    single_latents = torch.cat([noise(pipe, subjects, images, seed, 0.0) for _ in alone])
    singles = sample(
        pipe, single_prompts, num_steps=steps, guidance_scale=guidance, eta=0.0, latents=single_latents
    ).images
    faithful = []
    for image, look in zip(
        singles.float().cpu().numpy(), [x for x in looks for _ in range(images)], strict=True
    ):
        found = [d for d in identities.detect_identities(image, looks) if d.shape == look.class_word]
        faithful.append(len(found) == 1 and found[0].identity == look.name)
    return {
        "success": float(np.mean([r.all_present and not r.mixed for r in results])),
        "mixed": float(np.mean([bool(r.mixed) for r in results])),
        "dnc": float(np.mean([r.dnc for r in results])),
        "all_present": float(np.mean([r.all_present for r in results])),
        "fidelity": float(np.mean(faithful)),
        "images": drawn[: len(together) * images : images].float().cpu(),  # the first noise of each prompt
        "prompts": together,
    }


def run_one(task: dict) -> dict:
    """Train one (pair, seed, mode) and evaluate it with and without the mean shift; in a worker."""
    import torch

    torch.set_num_threads(task["threads"])
    from diffalign.personalize import load_personalize_config, personalize

    overrides = [
        f"model={task['model']}",
        f"subject_set=shapes-{task['pair']}",
        f"mode={task['mode']}",
        f"seed={task['seed']}",
        f"output_dir={task['folder']}",
        f"steps={task['steps']}",
        f"eval.every={task['steps']}",
        "eval.images_per_prompt=2",
        "save_every=100000",
        *SHAPES_RECIPE,
        *task["overrides"],
    ]
    config = load_personalize_config(None, overrides)
    wall, cpu = time.perf_counter(), time.process_time()
    result = personalize(config, progress=False)
    cpu_seconds, wall_seconds = time.process_time() - cpu, time.perf_counter() - wall
    subjects = subject_images(task["pair"])
    pipe = study_pipeline(result.lora_dir, task["model"])
    evaluations = {}
    for gamma in sorted({0.0, task["gamma"]}):
        evaluations[str(gamma)] = evaluate(
            pipe, task["pair"], subjects, seed=task["seed"], gamma=gamma, **task["sampling"]
        )
    return {
        "pair": task["pair"],
        "seed": task["seed"],
        "mode": task["mode"],
        "cpu_seconds": cpu_seconds,
        "wall_seconds": wall_seconds,
        "threads": task["threads"],
        "final_loss": float(np.mean([r["loss"] for r in result.history if "loss" in r][-20:])),
        "evaluations": evaluations,
    }


def base_one(task: dict) -> dict:
    """The base model (no LoRA) on the pair's prompts: what personalisation starts from."""
    import torch

    torch.set_num_threads(task["threads"])
    subjects = subject_images(task["pair"])
    pipe = study_pipeline(None, task["model"])
    evaluation = evaluate(pipe, task["pair"], subjects, seed=task["seed"], gamma=0.0, **task["sampling"])
    return {"pair": task["pair"], "seed": task["seed"], "mode": "base", "evaluations": {"0.0": evaluation}}


def arms_of(run: dict, gamma: float) -> dict[str, dict]:
    """The study's arms a trained run provides: its mode without the shift, and with it (``+init``)."""
    name = {"dreambooth": "dreambooth", "cutmix": "cutmix", "segmix": "mudi-no-init"}[run["mode"]]
    plain, shifted = run["evaluations"]["0.0"], run["evaluations"][str(gamma)]
    arms = {name: plain, f"{name}+init": shifted}
    if run["mode"] == "segmix":
        arms["mudi"] = shifted
    return arms


def summarise(runs: list[dict], gamma: float) -> dict:
    """``{kind: {arm: {metric: {mean, std, min, max, values}}}}``, plus CPU seconds per arm."""
    table: dict = {}
    for kind in KINDS:
        per_arm: dict[str, dict[str, list]] = {}
        for run in runs:
            if not run["pair"].startswith(kind):
                continue
            arms = {"base": run["evaluations"]["0.0"]} if run["mode"] == "base" else arms_of(run, gamma)
            for arm, evaluation in arms.items():
                values = per_arm.setdefault(arm, {metric: [] for metric in (*METRICS, "cpu_seconds")})
                for metric in METRICS:
                    values[metric].append(evaluation[metric])
                if "cpu_seconds" in run:
                    values["cpu_seconds"].append(run["cpu_seconds"])
        table[kind] = {
            arm: {metric: _stats(values) for metric, values in metrics.items() if values}
            for arm, metrics in per_arm.items()
        }
    return table


def _stats(values: list[float]) -> dict:
    array = np.asarray(values, dtype=float)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "min": float(array.min()),
        "max": float(array.max()),
        "values": [float(v) for v in array],
    }


def table(summary: dict) -> str:
    lines = [
        "| pairs | arm | success | mixed | D&C | fidelity | train CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    order = ("base", *ARMS, "dreambooth+init", "cutmix+init")
    for kind, arms in summary.items():
        for arm in order:
            if arm not in arms:
                continue
            row = arms[arm]

            def cell(metric: str, row=row) -> str:
                if metric not in row:
                    return "–"
                stats = row[metric]
                return f"{stats['mean']:.2f} ± {stats['std']:.2f}"

            seconds = f"{row['cpu_seconds']['mean']:.0f}" if "cpu_seconds" in row else "–"
            lines.append(
                f"| {kind} | {arm} | {cell('success')} | {cell('mixed')} | {cell('dnc')} | {cell('fidelity')} | {seconds} |"
            )
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("success", "mixed", "fidelity")
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    arms = [arm for arm in ("base", *ARMS) if all(arm in summary[kind] for kind in summary)]
    width = 0.8 / max(1, len(summary))
    for axis, metric in zip(axes[0], metrics, strict=True):
        for offset, kind in enumerate(summary):
            stats = [summary[kind][arm][metric] for arm in arms]
            x = np.arange(len(arms)) + offset * width
            means = np.array([s["mean"] for s in stats])
            low = means - np.array([s["min"] for s in stats])
            high = np.array([s["max"] for s in stats]) - means
            axis.bar(x, means, width, yerr=[low, high], capsize=3, label=kind)
        axis.set_xticks(np.arange(len(arms)) + width * (len(summary) - 1) / 2, arms, rotation=30, fontsize=8)
        axis.set_ylim(0, 1)
        axis.set_title(metric)
    axes[0][0].legend(fontsize=8)
    figure.suptitle("MuDI on ShapesWorld: mean and min..max over seeds", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def grids(runs: list[dict], images: dict, gamma: float, output: Path) -> list[Path]:
    """One grid per (pair, seed 0 of it): references, then each arm's images for the same prompts and noise."""
    import torch

    from diffalign import plots

    written = []
    for pair in sorted({run["pair"] for run in runs}):
        seed = min(run["seed"] for run in runs if run["pair"] == pair)
        subjects = subject_images(pair)
        rows, captions = [], []
        for item in subjects:
            for image in item.images[:4]:
                rows.append(
                    torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(
                        2, 0, 1
                    )
                )
                captions.append(f"reference: {item.subject.token}")
        for arm in ("base", *ARMS):
            key = (pair, seed, arm)
            if key not in images:
                continue
            drawn, prompts = images[key]
            rows.extend(drawn)
            captions.extend(f"{arm}: {p}" for p in prompts)
        path = output / f"grid-{pair}.png"
        plots.save_grid(torch.stack(rows), captions, path, title=f"{pair} (seed {seed})", columns=4)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output", default="results/mudi", help="folder for mudi.json, mudi.png and the grids"
    )
    parser.add_argument(
        "--pairs", nargs="+", help="subject pairs (default: similar-k and dissimilar-k, k = seed + 1)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--model",
        default="shapes",
        choices=["shapes", "shapes-flow"],
        help="the ShapesWorld model personalised: the UNet model or the SD3-style flow model",
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES.values()), choices=list(MODES.values()))
    parser.add_argument("--steps", type=int, default=2000, help="training steps of every run")
    parser.add_argument(
        "--gamma",
        type=float,
        default=0.1,
        help="the mean shift's strength for the +init arms (0.1: about sqrt(alpha_bar) at the first DDIM step)",
    )
    parser.add_argument("--images", type=int, default=16, help="noises per prompt in the evaluation")
    parser.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the evaluation samples")
    parser.add_argument(
        "--guidance", type=float, default=5.0, help="guidance scale of the evaluation samples"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="a personalize config override, key=value, after the study's ShapesWorld recipe (SHAPES_RECIPE)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (torch threads = cores / jobs)")
    parser.add_argument("--quick", action="store_true", help="smoke run: one similar pair, seed 0, 20 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.images, args.pairs = [0], 20, 2, ["similar-1"]
    output = Path(args.output)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    sampling = {"images": args.images, "steps": args.sample_steps, "guidance": args.guidance}
    plans = []
    for seed in args.seeds:
        pairs = args.pairs or [f"{kind}-{seed + 1}" for kind in KINDS]
        plans += [(pair, seed) for pair in pairs]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mudi-") as scratch:
        tasks = [
            {
                "pair": pair,
                "seed": seed,
                "mode": mode,
                "folder": str(Path(scratch) / f"{pair}-{mode}-seed{seed}"),
                "steps": args.steps,
                "gamma": args.gamma,
                "overrides": args.overrides,
                "model": args.model,
                "threads": threads,
                "sampling": sampling,
            }
            for pair, seed in plans
            for mode in args.modes
        ]
        bases = [
            {"pair": pair, "seed": seed, "threads": threads, "sampling": sampling, "model": args.model}
            for pair, seed in plans
        ]
        subject_images(plans[0][0])  # write the subject sets into the cache once, before the workers
        if args.jobs == 1:
            runs = [base_one(task) for task in bases] + [run_one(task) for task in tasks]
        else:
            # spawn, not fork: a forked worker of a process that already ran torch can hang in OpenMP.
            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                runs = list(pool.map(base_one, bases)) + list(pool.map(run_one, tasks))
    images = {}
    for run in runs:
        arms = {"base": run["evaluations"]["0.0"]} if run["mode"] == "base" else arms_of(run, args.gamma)
        for arm, evaluation in arms.items():
            images[(run["pair"], run["seed"], arm)] = (evaluation["images"], evaluation["prompts"])
        for evaluation in run["evaluations"].values():  # arms can share an evaluation: drop after reading
            evaluation.pop("images", None)
    summary = summarise(runs, args.gamma)
    result = {
        "settings": {**vars(args), "threads": threads, "wall_seconds": time.perf_counter() - started},
        "summary": summary,
        "runs": runs,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "mudi.json").write_text(json.dumps(result, indent=1), "utf-8")
    plot(summary, output / "mudi.png")
    grids(runs, images, args.gamma, output)
    print(table(summary))
    print(f"wrote {output / 'mudi.json'}, {output / 'mudi.png'} and the grids")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
