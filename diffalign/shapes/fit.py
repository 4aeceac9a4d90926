"""Which shape a blob is: fit each shape's blurred template to the blob's coverage map.

Thresholded features (how full the bounding box is, …) drift as soon as an image is
blurred or noisy, and a tiny diffusion model's samples are both. Fitting a template uses
every pixel instead, so pixel noise averages out, and the template is blurred to match the
image, so blur is explained rather than mistaken for a rounder shape.

Each hypothesis (circle, square, triangle) becomes a template from quantities that blur
and zero-mean noise leave unbiased: its centre from the coverage centroid (a symmetric blur
does not move it), its extent from the total coverage (blur does not change it) over the
brightness, which least squares fits; the blur width is whichever of a few candidates
leaves the least error. The shape whose template leaves the least error wins.
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


@dataclass(frozen=True)
class Fit:
    """The best-fitting shape, in the pixel coordinates of the coverage map."""

    shape: str
    x: float  # bounding-box centre
    y: float
    extent: float  # bounding-box side
    area: float  # total coverage
    residual: float  # error the fit leaves beyond pixel noise, over the signal: 0 perfect, 1 none
    margin: float  # (second-best − best residual) / their sum: 1 unambiguous, 0 a tie


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
    noise_energy = noise * valid.sum()
    signal = max((weights**2).sum() - noise_energy, 1e-12)
    fits = []
    for shape in SHAPES:
        error, box_y, extent = _fit_one(shape, weights, valid, area, cx, cy, blurs)
        fits.append((max(error - noise_energy, 0.0) / signal, shape, box_y, extent))
    fits.sort()
    (best, shape, box_y, extent), (second, *_) = fits[:2]
    margin = (second - best) / (second + best) if second + best > 0 else 0.0
    return Fit(shape, float(cx), float(box_y), float(extent), float(area), float(best), float(margin))


def _fit_one(
    shape: str, weights: np.ndarray, valid: np.ndarray, area: float, cx: float, cy: float, blurs: Sequence[float]
) -> tuple[float, float, float]:
    """Squared error, box centre y and extent of the best ``shape`` template."""
    h, w = weights.shape
    rows, cols = _blur_stack(h, tuple(blurs)), _blur_stack(w, tuple(blurs))  # [K, h, h], [K, w, w]
    energy = (weights**2).sum()
    brightness = 1.0
    for _ in range(2):  # the extent depends on the brightness, the brightness on the template
        extent = math.sqrt(area / (brightness * _AREA[shape]))
        box_y = cy - _DROP[shape] * extent
        sharp = _coverage(shape, cx, box_y, extent, (h, w))
        templates = rows @ sharp @ cols.transpose(0, 2, 1) * valid  # [K, h, w], one per blur
        overlap, norm = (templates * weights).sum((1, 2)), (templates**2).sum((1, 2))
        fitted = np.maximum(overlap / np.maximum(norm, 1e-12), 1e-3)  # least-squares brightness
        errors = energy - 2 * fitted * overlap + fitted**2 * norm
        best = int(np.argmin(errors))
        error, brightness = float(errors[best]), float(fitted[best])
    return max(error, 0.0), box_y, extent


def _coverage(shape: str, cx: float, cy: float, extent: float, size: tuple[int, int]) -> np.ndarray:
    """Pixel coverage ``[h, w]`` of ``shape`` with box centre (cx, cy) and side ``extent``.

    Coverage from the signed distance d of the pixel centre to the outline, clip(½ − d):
    exact for the axis-aligned edges, within a few hundredths for slanted ones and at
    corners, and many times cheaper than supersampling.
    """
    h, w = size
    dy = (np.arange(h) + 0.5 - cy)[:, None]
    dx = (np.arange(w) + 0.5 - cx)[None, :]
    half = extent / 2
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
