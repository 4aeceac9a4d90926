"""How exact the ShapesWorld detector is, on clean renders and on renders degraded the way a
tiny diffusion model's samples are (blurred, hue a little off, washed out, noisy).

Two figures: on random scenes, how often the detector recovers exactly the set of
(colour, shape) objects; on scenes sampled for prompts of each kind (train and held-out),
how often ``score == 1``. Plus detection speed. Run ``python -m diffalign.shapes.accuracy``.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from diffalign.shapes.detector import detect, score_detections
from diffalign.shapes.grammar import KINDS, parse, scene_for
from diffalign.shapes.splits import prompts
from diffalign.shapes.world import random_scene, render


@dataclass(frozen=True)
class Degradation:
    """Damage applied to a render; the defaults leave it untouched."""

    blur: float = 0.0  # Gaussian σ in pixels of a 32 px image (scaled with the image size)
    hue_shift: float = 0.0  # each image's hues rotate by a uniform random angle in ±this, degrees
    saturation: float = 1.0  # chroma multiplied by this (washed-out colours below 1)
    noise: float = 0.0  # σ of Gaussian pixel noise, image in [0, 1]


@dataclass(frozen=True)
class Accuracy:
    """Measured figures (rates in [0, 1])."""

    exact_scenes: float  # random scenes whose (colour, shape) multiset is recovered exactly
    score_one: dict[str, float]  # per prompt kind: scenes for a prompt that score exactly 1
    images_per_second: float  # detect() throughput, one image at a time on one core


def degrade(image: np.ndarray, rng: np.random.Generator, damage: Degradation) -> np.ndarray:
    """``image  # [H, W, 3] uint8`` → damaged ``[H, W, 3]`` float in [0, 1]."""
    if damage.blur > 0:
        radius = damage.blur * image.shape[0] / 32
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))
    rgb = image.astype(np.float64) / 255.0
    grey = rgb.mean(-1, keepdims=True)
    rgb = grey + damage.saturation * (rgb - grey) @ _hue_rotation(rng.uniform(-1, 1) * damage.hue_shift).T
    rgb = rgb + rng.normal(0.0, damage.noise, rgb.shape) if damage.noise > 0 else rgb
    return np.clip(rgb, 0.0, 1.0)


def measure(n: int = 3000, seed: int = 0, size: int = 32, damage: Degradation = Degradation()) -> Accuracy:
    """The detector's figures on ``n`` random scenes and ``n`` prompt scenes per kind."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    images = [degrade(render(s, size), rng, damage) for s in scenes]
    start = time.perf_counter()
    found = [detect(image) for image in images]
    speed = n / (time.perf_counter() - start)
    exact = np.mean(
        [
            Counter((o.colour, o.shape) for o in s.objects) == Counter((d.colour, d.shape) for d in ds)
            for s, ds in zip(scenes, found)
        ]
    )
    score_one = {}
    for kind in KINDS:
        pool = prompts("train", kind) + prompts("heldout", kind)
        hits = []
        for _ in range(n):
            facts = parse(pool[rng.integers(len(pool))])
            image = degrade(render(scene_for(facts, rng), size), rng, damage)
            hits.append(score_detections(detect(image), facts) == 1.0)
        score_one[kind] = float(np.mean(hits))
    return Accuracy(float(exact), score_one, speed)


def _hue_rotation(degrees: float) -> np.ndarray:
    """RGB rotation about the grey axis: turns every hue by about ``degrees``, greys fixed."""
    axis = np.ones(3) / np.sqrt(3.0)
    theta = np.deg2rad(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.cos(theta) * np.eye(3) + np.sin(theta) * cross + (1 - np.cos(theta)) * np.outer(axis, axis)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=3000, help="scenes per measurement")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    conditions = {
        "clean": Degradation(),
        "blur σ=1px": Degradation(blur=1.0),
        "hue ±20°": Degradation(hue_shift=20.0),
        "saturation ×0.5": Degradation(saturation=0.5),
        "noise σ=0.05": Degradation(noise=0.05),
        "all of these": Degradation(blur=1.0, hue_shift=20.0, saturation=0.5, noise=0.05),
    }
    print("size  condition        exact set  score=1 single / count / relation   images/s")
    for size in (32, 64):
        for name, damage in conditions.items():
            a = measure(args.n, args.seed, size, damage)
            kinds = " / ".join(f"{a.score_one[k]:.4f}" for k in KINDS)
            print(f"{size:>4}  {name:<16} {a.exact_scenes:9.4f}  {kinds:>33}   {a.images_per_second:8.0f}")


if __name__ == "__main__":
    main()
