"""ShapesWorld: coloured shapes on a plain background, sampled at random and rendered.

A scene is resolution-free (positions and sizes are fractions of the image side), so the
same scene renders at 32 or 64 pixels and the detector's answers do not depend on size.

Choices that the detector relies on (see ``detector.py``):

- Colours are saturated and spaced by hue (≥ 54° apart), the background is neutral grey.
  Anti-aliasing and blur mix an object's colour with the grey background, which keeps the
  hue exactly and only scales the chroma, so edge pixels never look like another colour.
  White and black are left out for that reason: they have no hue and blend into the grey.
- Shapes are axis-aligned and upright (a triangle points up, base = height = extent), so
  one template per shape, blurred to taste, explains any rendering of it.
- Objects never overlap and keep a gap, so each object is one blob, even when blurred.
- Size is a nuisance variable (extent 0.25–0.45 of the image side), not part of captions:
  a tiny generator's sizes drift, and "small"/"large" would be judged unreliably.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Ordered by hue; the detector derives each colour's hue from these RGB values.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (230, 215, 40),
    "green": (60, 190, 40),
    "cyan": (40, 200, 190),
    "blue": (70, 90, 235),
    "purple": (180, 50, 215),
}

# Dark neutral grey: zero chroma, darker than every colour, so objects stand out and the
# background can never be mistaken for a colour.
BACKGROUND: tuple[int, int, int] = (40, 40, 40)

SIZE_RANGE: tuple[float, float] = (0.25, 0.45)  # object extent, fraction of the image side
GAP = 0.08  # minimum space between objects' boxes (2.6 px at 32 px): blurred blobs stay apart
MARGIN = 0.03  # minimum space between an object and the image border
MAX_OBJECTS = 3
_BATCH = 64  # layouts drawn at once by the rejection sampler

# Drawing at 4× and box-averaging gives 16 coverage levels per pixel: smooth edges, and a
# pure mix of object and background colour (a Lanczos filter would ring into other hues).
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Obj:
    """One object. ``x, y``: centre of its bounding box, ``size``: the box side, all in [0, 1]
    image coordinates (y points down, as in images)."""

    shape: str
    colour: str
    size: float
    x: float
    y: float


@dataclass(frozen=True)
class Scene:
    """What an image shows: objects on a plain background."""

    objects: tuple[Obj, ...]
    background: tuple[int, int, int] = BACKGROUND


# A placement constraint looks at candidate centres [n, (x, y)] and sizes [n] and says
# whether the layout fits (e.g. "the first object is left of the second").
Constraint = Callable[[np.ndarray, np.ndarray], bool]


def place(
    kinds: Sequence[tuple[str, str]],
    rng: np.random.Generator,
    constraint: Constraint | None = None,
    tries: int = 200,
) -> Scene:
    """A scene with one object per ``(colour, shape)`` in ``kinds`` at random sizes and
    non-overlapping random positions, satisfying ``constraint`` if given.

    Rejection sampling keeps every valid layout equally likely. Each try draws sizes and a
    batch of layouts for them, so crowded scenes (three large objects) end up with smaller
    objects instead of failing.
    """
    for kind in kinds:
        _check_kind(*kind)
    n = len(kinds)
    for _ in range(tries):
        sizes = rng.uniform(*SIZE_RANGE, size=n)  # [n]
        low = sizes / 2 + MARGIN
        centres = rng.uniform(low[:, None], (1 - low)[:, None], size=(_BATCH, n, 2))  # [batch, n, (x, y)]
        for layout in centres[_apart(centres, sizes)]:
            if constraint is None or constraint(layout, sizes):
                return Scene(
                    tuple(
                        Obj(shape, colour, float(s), float(c[0]), float(c[1]))
                        for (colour, shape), s, c in zip(kinds, sizes, layout)
                    )
                )
    raise RuntimeError(f"could not place {n} objects satisfying the constraint in {tries} tries")


def random_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """1–``MAX_OBJECTS`` objects (or ``n_objects``) with independent random shape and colour.

    Any colour–shape pair can appear, held-out ones included: this is for testing the
    detector, not for training data (use ``splits.training_pairs`` for that).
    """
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    names = list(COLOURS)
    kinds = [(names[rng.integers(len(names))], SHAPES[rng.integers(len(SHAPES))]) for _ in range(n)]
    return place(kinds, rng)


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """The scene as an anti-aliased ``[size, size, 3]`` uint8 image; the same scene always
    gives the same pixels."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        half = obj.size * big / 2
        x0, y0 = obj.x * big - half, obj.y * big - half
        x1, y1 = obj.x * big + half, obj.y * big + half
        fill = COLOURS[obj.colour]
        # PIL's boxes include their last pixel, hence the -1 on the far corner.
        if obj.shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:
            draw.polygon([(obj.x * big, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    return np.asarray(image.reduce(SUPERSAMPLE))


def hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of ``rgb  # [..., 3]`` (any scale). Unchanged when the colour
    is mixed with any neutral grey, which is why the detector matches colours by hue."""
    r, g, b = np.moveaxis(np.asarray(rgb, dtype=np.float64), -1, 0)
    top = np.maximum(np.maximum(r, g), b)
    chroma = top - np.minimum(np.minimum(r, g), b)
    safe = np.where(chroma > 0, chroma, 1.0)
    h = np.where(top == r, (g - b) / safe, np.where(top == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return np.where(chroma > 0, (h * 60.0) % 360.0, 0.0)


def palette_hues() -> np.ndarray:
    """Hue of each colour in ``COLOURS`` order, degrees ``# [len(COLOURS)]``."""
    return hue(np.array(list(COLOURS.values()), dtype=np.float64))


def _apart(centres: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """For each layout in ``centres  # [batch, n, 2]``: whether every two boxes are at least
    ``GAP`` apart along x or along y ``# [batch] bool``."""
    ok = np.ones(len(centres), dtype=bool)
    for i in range(len(sizes)):
        for j in range(i + 1, len(sizes)):
            reach = (sizes[i] + sizes[j]) / 2 + GAP
            ok &= (np.abs(centres[:, i] - centres[:, j]) >= reach).any(-1)
    return ok


def _check_kind(colour: str, shape: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; ShapesWorld shapes are {', '.join(SHAPES)}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; ShapesWorld colours are {', '.join(COLOURS)}")
