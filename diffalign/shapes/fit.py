"""Which shape a blob is: fit each shape's blurred template to the blob's coverage map.

Thresholded features (how full the bounding box is, …) drift as soon as an image is
blurred or noisy, and a tiny diffusion model's samples are both. Fitting a template uses
every pixel instead, so pixel noise averages out, and the template is blurred to match the
image, so blur is explained rather than mistaken for a rounder shape.

Each hypothesis (circle, square, triangle) is placed with quantities that blur and
zero-mean noise leave unbiased: its centre is the coverage centroid (a symmetric blur does
not move it), and the total coverage (which blur does not change) ties its extent to its
brightness. Pixels fully inside an object read below 1 when it is blurred or noisy, so a
few extents are tried, each at the brightness that keeps the total, each under a few blur
widths; the least squared error is the hypothesis's fit, and the shape with the least
error wins. The error left beyond what pixel noise explains says whether any shape
explains the blob at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from diffalign.shapes.world import SHAPES

# Per unit of extent s (the bounding-box side), for a triangle of base s and height s:
_AREA = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / s²
_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6}  # centroid below box centre / s
# Candidate extents, relative to the one the total coverage implies at full brightness:
# noise and blur make the measured brightness of a pixel fully inside the object < 1.
_EXTENT_STEPS = np.linspace(0.85, 1.3, 7)


@dataclass(frozen=True)
class Fit:
    """The best-fitting shape, in the pixel coordinates of the coverage map."""

    shape: str
    x: float  # bounding-box centre
    y: float
    extent: float  # bounding-box side
    area: float  # total coverage
    residual: float  # error beyond what pixel noise explains, over the signal: 0 perfect, 1 none
    margin: float  # (second-best − best error) / their sum: 1 unambiguous, 0 a tie


def fit_shape(
    coverage: np.ndarray, valid: np.ndarray, blurs: Sequence[float], noise: float = 0.0
) -> Fit | None:
    """Fit ``coverage  # [h, w]`` (≈1 inside the object, ≈0 around it) on the ``valid  #
    [h, w] bool`` pixels (the others belong to other objects), trying each blur width in
    ``blurs`` (pixels). ``noise`` is the variance of a background pixel's coverage, whose
    share of the error no template can remove. ``None`` when there is no mass to fit."""
    weights = np.where(valid, coverage, 0.0)
    area = weights.sum()
    if not area > 0:
        return None
    rows, cols = np.indices(coverage.shape) + 0.5  # pixel centres
    cx, cy = (weights * cols).sum() / area, (weights * rows).sum() / area
    # Pixel noise leaves an error of about noise × pixels (give or take 3 sd) that no
    # template can remove; only the error beyond it is misfit.
    pixels = valid.sum()
    allowance = noise * pixels + 3 * noise * math.sqrt(2 * pixels)
    signal = max((weights**2).sum() - noise * pixels, 1e-12)
    fits = sorted((*_fit_one(shape, weights, valid, area, cx, cy, blurs), shape) for shape in SHAPES)
    (best, box_y, extent, shape), (second, *_) = fits[:2]
    margin = (second - best) / (second + best) if second + best > 0 else 0.0
    residual = max(best - allowance, 0.0) / signal
    return Fit(shape, float(cx), float(box_y), float(extent), float(area), float(residual), float(margin))


def _fit_one(
    shape: str,
    weights: np.ndarray,
    valid: np.ndarray,
    area: float,
    cx: float,
    cy: float,
    blurs: Sequence[float],
) -> tuple[float, float, float]:
    """Squared error, box centre y and extent of the best ``shape`` template."""
    h, w = weights.shape
    extents = math.sqrt(area / _AREA[shape]) * _EXTENT_STEPS  # [E]
    box_y = cy - _DROP[shape] * extents  # [E]
    sharp = _coverage(shape, cx, box_y, extents, (h, w))  # [E, h, w]
    rows, cols = _blur_stack(h, tuple(blurs)), _blur_stack(w, tuple(blurs))  # [K, h, h], [K, w, w]
    templates = rows @ sharp[:, None] @ cols.transpose(0, 2, 1) * valid  # [E, K, h, w]
    overlap, norm = (templates * weights).sum((-2, -1)), (templates**2).sum((-2, -1))  # [E, K]
    brightness = (area / (_AREA[shape] * extents**2))[:, None]  # [E, 1]: the total coverage fixes it
    errors = (weights**2).sum() - 2 * brightness * overlap + brightness**2 * norm  # [E, K]
    best, _ = np.unravel_index(np.argmin(errors), errors.shape)
    return max(float(errors.min()), 0.0), float(box_y[best]), float(extents[best])


def _coverage(shape: str, cx: float, cy: np.ndarray, extent: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pixel coverage ``[E, h, w]`` of ``shape`` with box centres (cx, cy[e]) and sides
    ``extent[e]``, one per candidate.

    Coverage from the signed distance d of the pixel centre to the outline, clip(½ − d):
    exact for the axis-aligned edges, within a few hundredths for slanted ones and at
    corners, and many times cheaper than supersampling.
    """
    h, w = size
    dy = np.arange(h)[None, :, None] + 0.5 - cy[:, None, None]  # [E, h, 1]
    dx = np.arange(w)[None, None, :] + 0.5 - cx  # [1, 1, w]
    half = extent[:, None, None] / 2
    if shape == "circle":
        distance = np.sqrt(dx**2 + dy**2) - half
    elif shape == "square":
        qx, qy = np.abs(dx) - half, np.abs(dy) - half
        distance = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
    else:  # upright triangle, apex at the top centre: the nearest of its three edge lines
        slanted = (2 * np.abs(dx) - dy - half) / math.sqrt(5)
        distance = np.maximum(slanted, dy - half)
    return np.clip(0.5 - distance, 0.0, 1.0)


@lru_cache(maxsize=256)
def _blur_stack(n: int, sigmas: tuple[float, ...]) -> np.ndarray:
    """``[K, n, n]``: one Gaussian blur over pixels per width in ``sigmas``. Each weight is the
    Gaussian's mass over a pixel, so σ → 0 is the identity; mass leaving the edges is lost,
    as in an image."""
    stack = np.empty((len(sigmas), n, n))
    edges = np.arange(-n + 0.5, n)  # between the 2n - 1 offsets -(n-1) … n-1
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :] + (n - 1)
    for k, sigma in enumerate(sigmas):
        if sigma < 1e-3:
            stack[k] = np.eye(n)
            continue
        cdf = np.array([0.5 * (1 + math.erf(e / (sigma * math.sqrt(2)))) for e in edges])
        stack[k] = np.diff(cdf)[offsets]
    return stack
