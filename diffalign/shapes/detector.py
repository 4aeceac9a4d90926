"""The exact ShapesWorld detector: objects from pixels, and how well an image fits a prompt.

Detection, in four steps, each chosen to survive what a tiny diffusion model draws (soft
edges, blur, colours a little off or washed out, pixel noise, a tinted background):

1. Colour per pixel by **hue**. Mixing a colour with the neutral background (anti-aliasing,
   blur) keeps its hue and only lowers its chroma (max − min channel), so a pixel is
   "coloured" if its chroma passes a low threshold and takes the palette colour of nearest
   hue. Palette hues are ≥ 54° apart, so hues up to ±27° off still land right.
2. **Regions**: connected (4-neighbour) pixels of one colour that are at least half
   covered (chroma ≥ half the colour's typical chroma). Cutting at half coverage follows
   the objects' outlines, which blur does not move, so blurred edges do not bridge nearby
   objects; regions under a third of the smallest object are noise.
3. **Coverage**: every pixel's colour projected on the region's colour, over the region's
   typical value, in a window around the region (other objects masked out). It is linear
   in the pixels, so noise averages out in what is computed from it, and it is measured
   above the background's own tint.
4. **Shape**: a template of each shape, blurred to match, is fitted to the coverage
   (``fit.py``); the best fit gives the shape, the box centre and a confidence. A region
   no template explains (an ellipse, two blobs merged, a streak) or wider than 70% of the
   image is reported with shape ``"unknown"``: it never satisfies a prompt and counts as
   an unrequested object, so painting the whole image red does not earn "a red square".

Scoring: a prompt is a list of facts — each requested object instance is present (a
detection of that colour and shape; "three blue squares" is three facts) and each relation
holds between the centres of the matched objects (the most confident detection of each).
Every detection the prompt did not ask for (another kind, a surplus copy, an unknown blob)
adds one violated fact "there is no such object". The score is the fraction of facts that
hold: 1 exactly when the image shows what the prompt says and nothing else, partial credit
otherwise, and 0 for an empty, blank or pure-noise image (the denominator is never 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from diffalign.shapes.fit import fit_shape
from diffalign.shapes.grammar import Facts, holds, parse
from diffalign.shapes.world import COLOURS, hue, palette_hues

UNKNOWN = "unknown"

MIN_CHROMA = 0.15  # of 1; palette chroma is ≥ 0.65, background tint from a generator ≪ 0.15
CORE_LEVEL = 0.5  # of a colour's typical chroma: pixels at least half covered by an object
MIN_AREA = 0.01  # of the image; the smallest object (a 0.25 triangle) covers 0.031
MAX_EXTENT = 0.7  # of the image side; objects are at most 0.45
MAX_RESIDUAL = 0.15  # misfit beyond which a region is no shape we know (an ellipse is 0.24)
WINDOW_MARGIN = 0.08  # of the image side: room around a region for its blurred edges
BLURS = (0.0, 0.5, 1.0, 1.5, 2.0)  # Gaussian widths tried, pixels of a 32 px image

_COLOUR_NAMES = list(COLOURS)


@dataclass(frozen=True)
class Detection:
    """One object found in an image. ``shape``: one of ``SHAPES`` or ``"unknown"``; ``x, y``:
    bounding-box centre in [0, 1] image coordinates (y down); ``area``: fraction of the
    image covered; ``confidence`` in [0, 1]: the smaller of the colour margin (1 = exactly a
    palette hue, 0 = halfway to the next) and the shape margin (1 = no other shape fits
    nearly as well, 0 = a tie); 0 for unknown shapes."""

    shape: str
    colour: str
    x: float
    y: float
    area: float
    confidence: float

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x, self.y)


def detect(image: np.ndarray | torch.Tensor) -> list[Detection]:
    """The objects in ``image``: ``[H, W, 3]`` uint8, or float in [0, 1] as ``[3, H, W]``
    (tensor or array) or ``[H, W, 3]``. Never fails on content (NaN, blank, noise)."""
    rgb = as_rgb(image)  # [H, W, 3] float64 in [0, 1]
    height, width = rgb.shape[:2]
    chroma = rgb.max(-1) - rgb.min(-1)  # [H, W]
    hues = hue(rgb)  # [H, W] degrees
    nearest = np.argmin(_hue_distance(hues[..., None], palette_hues()), axis=-1)  # [H, W]
    classes = np.where(chroma >= MIN_CHROMA, nearest + 1, 0)  # [H, W], 0 = background
    # Regions are cut at half coverage (the object's outline, which blur does not move),
    # so blurred edges cannot bridge two nearby objects of the same colour.
    cores = np.zeros_like(classes)
    for colour in np.unique(classes[classes > 0]):
        member = classes == colour
        cores[member & (chroma >= CORE_LEVEL * np.percentile(chroma[member], 90))] = colour
    labels = components(cores)  # [H * W + 1], background = H * W
    sizes = np.bincount(labels, minlength=height * width + 1)[:-1]
    roots = np.flatnonzero(sizes >= MIN_AREA * height * width)

    chromatic = rgb - rgb.mean(-1, keepdims=True)  # [H, W, 3]: each pixel's colour minus its grey
    if (classes == 0).any():  # a generator may tint the background; measure colour above it
        chromatic -= np.median(chromatic[classes == 0], axis=0)
    margin = math.ceil(WINDOW_MARGIN * max(height, width))
    blurs = tuple(b * max(height, width) / 32 for b in BLURS)  # a generator's blur grows with its size
    kept = np.isin(labels[:-1], roots).reshape(height, width)
    far = ~dilate(kept, margin)  # background away from every object: shows the pixel noise
    detections = []
    for root in roots:
        region = (labels[:-1] == root).reshape(height, width)
        # Other objects and their blurred edges say nothing about this one. All else is
        # evidence, noise included: dropping noisy pixels by their colour would keep only
        # those that look like this object and bias its coverage up.
        valid = region | ~dilate(kept & ~region, margin)
        found = _measure(region, valid, far, cores, chromatic, hues, chroma, margin, blurs)
        if found is not None:
            detections.append(found)
    return detections


def score(image: np.ndarray | torch.Tensor, prompt: str | Facts) -> float:
    """Fraction in [0, 1] of the prompt's facts the image satisfies (see the module doc)."""
    facts = parse(prompt) if isinstance(prompt, str) else prompt
    return score_detections(detect(image), facts)


def correct(image: np.ndarray | torch.Tensor, prompt: str | Facts) -> bool:
    """Whether every fact holds: the requested objects, in the requested relation, and
    nothing else."""
    return score(image, prompt) == 1.0


def score_batch(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``score`` for ``images  # [B, 3, H, W] in [0, 1]`` → ``[B]`` float32 on their device.
    Not differentiable (detection is discrete)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(
            f"got {images.shape[0]} images but {len(prompts)} prompts; give one prompt per image"
        )
    pixels = images.detach().float().cpu().numpy()
    values = [score(pixels[i], p) for i, p in enumerate(prompts)]
    return torch.tensor(values, dtype=torch.float32, device=images.device)


def score_detections(detections: list[Detection], facts: Facts) -> float:
    """The score of already detected objects against ``facts``."""
    ranked = sorted(detections, key=lambda d: -d.confidence)
    matched = [
        [d for d in ranked if (d.colour, d.shape) == (e.colour, e.shape)][: e.count] for e in facts.entities
    ]
    found = sum(len(m) for m in matched)
    related = sum(
        bool(matched[r.subject] and matched[r.object])
        and holds(r.relation, matched[r.subject][0].centre, matched[r.object][0].centre)
        for r in facts.relations
    )
    requested = sum(e.count for e in facts.entities) + len(facts.relations)
    unrequested = len(detections) - found
    return (found + related) / (requested + unrequested)


def as_rgb(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """``image`` as ``[H, W, 3]`` float64 in [0, 1]; NaN becomes 0, values are clipped."""
    if isinstance(image, torch.Tensor):  # floats as float32 (numpy has no bfloat16), uint8 as is
        image = (image.detach().float() if image.is_floating_point() else image.detach()).cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected one RGB image [H, W, 3] or [3, H, W], got shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float64) / 255.0
    return np.clip(np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def _measure(
    region: np.ndarray,
    valid: np.ndarray,
    far: np.ndarray,
    cores: np.ndarray,
    chromatic: np.ndarray,
    hues: np.ndarray,
    chroma: np.ndarray,
    margin: int,
    blurs: tuple[float, ...],
) -> Detection | None:
    """The object behind one region (``[H, W] bool``): its colour from the region's hues, its
    shape and geometry from fitting templates to its coverage on the ``valid`` pixels of a
    window around it, with the pixel noise measured on the ``far`` background."""
    height, width = region.shape
    ys, xs = np.nonzero(region)
    top, left = max(ys.min() - margin, 0), max(xs.min() - margin, 0)
    window = (slice(top, min(ys.max() + margin + 1, height)), slice(left, min(xs.max() + margin + 1, width)))
    # Coverage: each pixel's colour projected on the object's colour, relative to the
    # object's typical pixel. Linear, so pixel noise averages out instead of adding up.
    direction = chromatic[region].mean(0)
    direction /= max(np.linalg.norm(direction), 1e-12)
    typical = max(np.percentile(chromatic[region] @ direction, 90), 1e-6)
    coverage = chromatic[window] @ direction / typical  # [h, w]
    noise = noise_variance(chromatic[far] @ direction / typical)
    fit = fit_shape(coverage, valid[window], blurs, noise)
    if fit is None or fit.area < MIN_AREA * height * width:  # too little coherent colour: noise
        return None
    plausible = fit.extent <= MAX_EXTENT * min(height, width) and fit.residual <= MAX_RESIDUAL
    return Detection(
        shape=fit.shape if plausible else UNKNOWN,
        colour=_COLOUR_NAMES[cores[ys[0], xs[0]] - 1],
        x=float(np.clip((left + fit.x) / width, 0.0, 1.0)),
        y=float(np.clip((top + fit.y) / height, 0.0, 1.0)),
        area=float(fit.area / (height * width)),
        confidence=min(fit.margin, _colour_confidence(hues[region], chroma[region])) if plausible else 0.0,
    )


def noise_variance(values: np.ndarray) -> float:
    """Variance of pixel noise from background values, robustly (median absolute deviation,
    so stray object edges do not inflate it); 0 when there is too little background."""
    if values.size < 16:
        return 0.0
    return float((1.4826 * np.median(np.abs(values - np.median(values)))) ** 2)


def _colour_confidence(hues: np.ndarray, chroma: np.ndarray) -> float:
    """Margin of the region's chroma-weighted mean hue between its two nearest palette hues."""
    angle = np.deg2rad(hues)
    mean = np.rad2deg(np.arctan2(chroma @ np.sin(angle), chroma @ np.cos(angle))) % 360.0
    first, second = np.sort(_hue_distance(mean, palette_hues()))[:2]
    return float((second - first) / (second + first))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask  # [H, W] bool`` grown by ``radius`` pixels in every direction (a square)."""
    height, width = mask.shape
    padded = np.pad(mask, radius)
    across = np.zeros((height + 2 * radius, width), dtype=bool)
    for shift in range(2 * radius + 1):
        across |= padded[:, shift : shift + width]
    grown = np.zeros((height, width), dtype=bool)
    for shift in range(2 * radius + 1):
        grown |= across[shift : shift + height]
    return grown


def _hue_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angular distance in degrees between hues (broadcasting)."""
    d = np.abs(a - b) % 360.0
    return np.minimum(d, 360.0 - d)


def components(classes: np.ndarray) -> np.ndarray:
    """Connected regions of equal non-zero class (4-neighbour) → ``[H * W + 1]`` labels:
    each pixel gets the flat index of its region's first pixel, background (and the extra
    last entry) get ``H * W``.

    Label propagation with pointer jumping, all in numpy: every pixel repeatedly takes the
    smallest label among its same-class neighbours, then follows its label's label. Labels
    only ever point to a pixel of the same region with a smaller index, so the fixed point
    is the region's first pixel; it takes a few dozen cheap passes, not a Python loop per
    pixel.
    """
    height, width = classes.shape
    n = height * width
    joined_right = (classes[:, :-1] > 0) & (classes[:, :-1] == classes[:, 1:])  # [H, W-1]
    joined_down = (classes[:-1] > 0) & (classes[:-1] == classes[1:])  # [H-1, W]
    labels = np.append(np.where(classes.ravel() > 0, np.arange(n), n), n)
    while True:
        previous = labels.copy()
        grid = labels[:n].reshape(height, width)
        np.minimum(grid[:, :-1], grid[:, 1:], out=grid[:, :-1], where=joined_right)
        np.minimum(grid[:, 1:], grid[:, :-1], out=grid[:, 1:], where=joined_right)
        np.minimum(grid[:-1], grid[1:], out=grid[:-1], where=joined_down)
        np.minimum(grid[1:], grid[:-1], out=grid[1:], where=joined_down)
        labels = labels[labels[labels]]
        if np.array_equal(labels, previous):
            return labels
