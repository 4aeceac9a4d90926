"""How good is the shipped ShapesWorld model, by the exact oracle?

For each split (train compositions, held-out compositions) and prompt kind (single object,
count, relation) it samples fixed prompts with fixed noise and reports the oracle's mean
score and the share of images that are exactly right. It also measures the sampling speed
the world was sized for (8 images, 20 DDIM steps) and saves grids of generations beside
renders of the same prompts.

    python -m diffalign.benchmarks.shapes_quality            # ~2-4 minutes on 2 CPU cores
    python -m diffalign.benchmarks.shapes_quality --quick    # smoke run

From Python: ``run(...)`` returns the dict written as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffalign import families, pipeline, plots
from diffalign.sampling import sample
from diffalign.shapes import correct, parse, render, scene_for, score
from diffalign.shapes.grammar import KINDS
from diffalign.shapes.splits import prompts as split_prompts


def draw_prompts(split: str, kind: str, count: int, seed: int) -> list[str]:
    """``count`` prompts of a split and kind, drawn with replacement reproducibly."""
    pool = split_prompts(split, kind)
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.integers(len(pool), size=count)]


def generate(
    pipe, prompts: list[str], *, steps: int, guidance: float, seed: int, batch: int = 32
) -> torch.Tensor:
    """Deterministic (η = 0) generations from seeded noise, ``[N, 3, H, W]`` in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    latents = families.of(pipe).initial_latents(pipe, len(prompts), generator)
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        trajectory = sample(
            pipe,
            chunk,
            num_steps=steps,
            guidance_scale=guidance,
            eta=0.0,
            latents=latents[start : start + len(chunk)],
        )
        images.append(trajectory.images)
    return torch.cat(images)


def renders(prompts: list[str], seed: int, size: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    arrays = [render(scene_for(parse(p), rng), size) for p in prompts]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def sampling_seconds(pipe, steps: int, repeats: int = 3) -> float:
    """Median seconds to sample 8 images in ``steps`` DDIM steps with guidance (the world's speed target)."""
    prompts = draw_prompts("train", "relation", 8, 0)
    times = []
    for repeat in range(repeats + 1):
        started = time.perf_counter()
        sample(
            pipe,
            prompts,
            num_steps=steps,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(repeat),
        )
        times.append(time.perf_counter() - started)
    return float(np.median(times[1:]))


def run(
    model: str = "shapes",
    *,
    per_cell: int = 64,
    steps: int = 20,
    guidances: tuple[float, ...] = (5.0,),
    seed: int = 0,
    output: Path | None = None,
    grids: Path | None = None,
) -> dict:
    """Oracle scores of ``model``'s images per split and kind; written as JSON to ``output`` and
    sample grids into ``grids`` when they are given (``main``: ``./results/shapes_quality/``)."""
    pipe = pipeline.load(model)
    result: dict = {"model": model, "per_cell": per_cell, "steps": steps, "seed": seed, "by_guidance": {}}
    for guidance in guidances:
        cells = {}
        for split in ("train", "heldout"):
            for kind in KINDS:
                prompts = draw_prompts(split, kind, per_cell, seed)
                images = generate(pipe, prompts, steps=steps, guidance=guidance, seed=seed)
                scores = [score(image, p) for image, p in zip(images, prompts)]
                exact = [correct(image, p) for image, p in zip(images, prompts)]
                cells[f"{split}/{kind}"] = {
                    "oracle_mean": float(np.mean(scores)),
                    "exact": float(np.mean(exact)),
                }
                if grids is not None and guidance == guidances[0]:
                    shown = 8
                    size = images.shape[-1]
                    side_by_side = torch.stack([renders(prompts[:shown], seed, size), images[:shown]], dim=1)
                    captions = [f"{label}: {p}" for p in prompts[:shown] for label in ("render", "model")]
                    plots.save_grid(
                        side_by_side.flatten(0, 1),
                        captions,
                        grids / f"{split}-{kind}.png",
                        scores=[v for s in scores[:shown] for v in (1.0, s)],
                        columns=4,
                        title=f"{model}: {split} {kind} prompts (render | generation, oracle score)",
                    )
        result["by_guidance"][str(guidance)] = cells
    result["sampling_seconds_8_images_20_steps"] = sampling_seconds(pipe, 20)
    result["torch_threads"] = torch.get_num_threads()
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2), "utf-8")
    return result


def format_table(result: dict) -> str:
    lines = [f"{'guidance':>8}  {'split/kind':<18} {'oracle mean':>11} {'exact':>7}"]
    for guidance, cells in result["by_guidance"].items():
        for cell, values in cells.items():
            lines.append(f"{guidance:>8}  {cell:<18} {values['oracle_mean']:11.3f} {values['exact']:7.3f}")
    lines.append(
        f"sampling 8 images x 20 DDIM steps: {result['sampling_seconds_8_images_20_steps']:.2f} s "
        f"({result['torch_threads']} torch threads)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--per-cell", type=int, default=64, help="prompts per (split, kind)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, nargs="+", default=[5.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output",
        default="results/shapes_quality",
        help="folder for shapes_quality.json and the grids (default: %(default)s, under the current folder)",
    )
    parser.add_argument("--quick", action="store_true", help="8 prompts per cell, 5 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.per_cell, args.steps = 8, 5
    result = run(
        args.model,
        per_cell=args.per_cell,
        steps=args.steps,
        guidances=tuple(args.guidance),
        seed=args.seed,
        output=Path(args.output) / "shapes_quality.json",
        grids=Path(args.output),
    )
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
