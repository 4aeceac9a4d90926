"""ShapesWorld subjects for multi-subject personalisation (MuDI): marked shapes the base model never saw.

The shipped training data holds plain single-colour shapes only, so a shape that carries a
*marking* — a second-colour region inside it — is an identity the ``shapes`` model has to be
taught (DreamBooth) from a few images. Three markings, each large enough to be drawn and read at
32 px (a 0.25 object is 8 px, its dot 3.5 px across):

- ``dot``: a disc of 0.44 of the object's extent at the shape's centroid;
- ``band``: a horizontal band of 0.32 of the extent through the centroid, clipped to the shape;
- ``half``: the left half of the object (a two-tone split).

``CATALOGUE`` holds eight identities, each named in prompts by a made-up identifier that the CLIP
tokenizer keeps as one token and that is no English word (``zog circle``), and ``SUBJECT_PAIRS``
names pairs of them: *similar* pairs share shape and body colour and differ only in the marking
(kind and colour) — where MuDI's identity mixing happens — and *dissimilar* pairs differ in shape,
colour and marking.

The exact identity detector (``detect_identities``) reads, for each object, its shape, body colour,
marking and marking colour. It keeps the ShapesWorld detector's discipline (``detector.py``):

1. **Objects** are cut by how far a pixel is from the background colour, not by hue: every palette
   colour lies above the dark grey background in every channel, so a blend of two colours (the
   anti-aliased edge between a body and its marking) never cancels, whereas its hue can land on a
   third palette colour (red + blue looks purple) and its chroma can vanish (red + cyan is grey).
2. **Colours** by linear unmixing: each pixel minus the background is fitted as a non-negative
   combination of one or two palette colours (minus the background); the pair of colours that
   explains the object best wins. Anti-aliasing and blur are linear mixes, so on clean renders the
   coverages are exact and under noise they average out.
3. **Shape** from the total coverage of both colours with the detector's template fit (``fit.py``).
4. **Marking**: the pixels inside the object (total coverage ≥ ½) where the second colour is the
   larger share — a half-coverage cut, which blur does not move — are described by their area
   fraction, centroid offset and spread relative to the fitted box, and matched to the same
   description of each marking measured on a large clean render. Both ways round are tried (which
   colour is the body is part of the match), and a description far from every marking is
   ``"unknown"``.

Measured (``measure_accuracy``, seeded; random scenes of one to three objects at 32 px with traits
drawn independently, so every shape × colour × marking occurs, plain ones included; a scene counts
only if every object's four traits are read exactly), 500 scenes per condition (seed 1):

    clean renders 100 %            Gaussian blur σ = 0.5 px 100 %, 1 px 100 %, 1.5 px 88.4 %
    pixel noise σ = 0.05 100 %     pixel noise σ = 0.1 95.6 %      blur 1 px + noise 0.05 99.0 %

Mixed objects (one identity's marking trait on the other's body) are flagged for all six pairs in
the tests; flagging is exact whenever the traits are read exactly.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diffalign.errors import DiffalignError
from diffalign.shapes.world import BACKGROUND, COLOURS, SHAPES, SUPERSAMPLE, Constraint, place

MARKINGS: tuple[str, ...] = ("dot", "band", "half")
UNKNOWN = "unknown"
DOT_DIAMETER = 0.44  # of the extent: 3.5 px on the smallest (8 px) object at 32 px
BAND_HEIGHT = 0.32  # of the extent: 2.6 px on the smallest object


class UnknownIdentity(DiffalignError, KeyError):
    """An identity or subject pair name that the catalogue does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Traits:
    """What an object looks like: its shape, body colour, and marking (None: plain) in its colour."""

    shape: str
    colour: str
    marking: str | None = None
    marking_colour: str | None = None

    @property
    def traits(self) -> Traits:
        """Itself, so that a ``Traits`` stands wherever an ``Identity``'s look is asked for."""
        return self

    def slots(self) -> tuple[str | None, ...]:
        """The four traits compared between objects (similarity, mixing)."""
        return (self.shape, self.colour, self.marking, self.marking_colour)


def _check_traits(traits: Traits) -> None:
    if traits.shape not in SHAPES:
        raise ValueError(f"unknown shape {traits.shape!r}; ShapesWorld shapes are {', '.join(SHAPES)}")
    for colour in (traits.colour, traits.marking_colour):
        if colour is not None and colour not in COLOURS:
            raise ValueError(f"unknown colour {colour!r}; ShapesWorld colours are {', '.join(COLOURS)}")
    if traits.marking is not None and traits.marking not in MARKINGS:
        raise ValueError(f"unknown marking {traits.marking!r}; the markings are {', '.join(MARKINGS)}")
    if (traits.marking is None) != (traits.marking_colour is None):
        raise ValueError("a marking needs its colour and a colour its marking (both None for a plain object)")


@dataclass(frozen=True)
class Identity:
    """A subject of ShapesWorld: a named look, and how prompts name it (``identifier class_word``)."""

    name: str  # readable and unique, used for folders: "red-circle-yellow-dot"
    identifier: str  # the rare token prompts use: "zog"
    shape: str
    colour: str
    marking: str
    marking_colour: str

    def __post_init__(self) -> None:
        _check_traits(self.traits)
        if self.marking_colour == self.colour:
            raise ValueError(
                f"identity {self.name!r}: the marking colour equals the body colour ({self.colour}), so the "
                "marking would be invisible; pick another palette colour for it"
            )

    @property
    def class_word(self) -> str:
        """What it is, as DreamBooth's class word: its shape."""
        return self.shape

    @property
    def token(self) -> str:
        """How prompts name it: ``"zog circle"``."""
        return f"{self.identifier} {self.class_word}"

    @property
    def traits(self) -> Traits:
        return Traits(self.shape, self.colour, self.marking, self.marking_colour)


def _identity(identifier: str, shape: str, colour: str, marking: str, marking_colour: str) -> Identity:
    name = f"{colour}-{shape}-{marking_colour}-{marking}"
    return Identity(name, identifier, shape, colour, marking, marking_colour)


# Identifiers: single CLIP tokens (checked in the tests), not English words, none a word of the
# ShapesWorld grammar. "sks", "olis" and "hta" are avoided: they are the usual DreamBooth examples.
CATALOGUE: dict[str, Identity] = {
    i.name: i
    for i in (
        _identity("zog", "circle", "red", "dot", "yellow"),
        _identity("mib", "circle", "red", "band", "cyan"),
        _identity("zeb", "square", "blue", "half", "yellow"),
        _identity("wib", "square", "blue", "dot", "red"),
        _identity("fex", "triangle", "green", "band", "purple"),
        _identity("ruk", "triangle", "green", "half", "red"),
        _identity("rix", "square", "purple", "band", "cyan"),
        _identity("plo", "circle", "yellow", "half", "purple"),
    )
}
_BY_IDENTIFIER = {i.identifier: i for i in CATALOGUE.values()}
_ORDER = list(CATALOGUE)

# Similar: same shape and body colour, the marking differs in kind and colour (a mixed object —
# one's marking kind in the other's marking colour — is then always readable as mixed).
# Dissimilar: shape, body colour, marking kind and marking colour all differ, and neither marking is
# in the other's body colour (so either one's marking on the other's body is visible).
SUBJECT_PAIRS: dict[str, tuple[str, str]] = {
    "similar-1": (_ORDER[0], _ORDER[1]),  # red circles: yellow dot / cyan band
    "similar-2": (_ORDER[2], _ORDER[3]),  # blue squares: yellow half / red dot
    "similar-3": (_ORDER[4], _ORDER[5]),  # green triangles: purple band / red half
    "dissimilar-1": (_ORDER[0], _ORDER[4]),  # red circle, yellow dot / green triangle, purple band
    "dissimilar-2": (_ORDER[3], _ORDER[7]),  # blue square, red dot / yellow circle, purple half
    "dissimilar-3": (_ORDER[5], _ORDER[6]),  # green triangle, red half / purple square, cyan band
}


def identity(name: str) -> Identity:
    """The catalogued identity called ``name`` (or with identifier ``name``)."""
    if name in CATALOGUE:
        return CATALOGUE[name]
    if name in _BY_IDENTIFIER:
        return _BY_IDENTIFIER[name]
    raise UnknownIdentity(
        f"no ShapesWorld identity {name!r}; the catalogue holds {', '.join(CATALOGUE)} "
        f"(identifiers {', '.join(_BY_IDENTIFIER)})"
    )


def pair(name: str) -> tuple[Identity, Identity]:
    """The two identities of the subject pair ``name`` (a key of ``SUBJECT_PAIRS``)."""
    if name not in SUBJECT_PAIRS:
        raise UnknownIdentity(f"no subject pair {name!r}; the pairs are {', '.join(SUBJECT_PAIRS)}")
    first, second = SUBJECT_PAIRS[name]
    return CATALOGUE[first], CATALOGUE[second]


def mix(
    body: Identity | Traits, other: Identity | Traits, take: Sequence[str] = ("marking", "marking_colour")
) -> Traits:
    """The look of a *mixed* object — what MuDI calls identity mixing, drawn on purpose to test that it
    is flagged: ``body``'s traits with those named in ``take`` from ``other``. The default puts
    ``other``'s marking on ``body``; within a similar pair (same body) take one marking trait, e.g.
    ``take=("marking_colour",)``: A's dot in B's colour."""
    a, b = (
        body.traits if isinstance(body, Identity) else body,
        other.traits if isinstance(other, Identity) else other,
    )
    unknown = set(take) - {"shape", "colour", "marking", "marking_colour"}
    if unknown:
        raise ValueError(f"cannot take {sorted(unknown)}; traits are shape, colour, marking, marking_colour")
    return Traits(
        *(getattr(b if f in take else a, f) for f in ("shape", "colour", "marking", "marking_colour"))
    )


def prompt(identities: Sequence[Identity], template: str = "a photo of {subjects}") -> str:
    """The prompt that names each subject once: ``"a photo of zog circle and mib circle"`` (MuDI's
    form: identifier + class word per subject, joined by "and")."""
    if not identities:
        raise ValueError("a prompt needs at least one identity")
    tokens = [i.token for i in identities]
    subjects = tokens[0] if len(tokens) == 1 else ", ".join(tokens[:-1]) + " and " + tokens[-1]
    return template.format(subjects=subjects)


def pair_prompts(name: str) -> list[str]:
    """The multi-subject prompts for the pair ``name`` the study evaluates: both orders (CLIP reads
    word order, and mixing must not depend on it), with and without "a photo of"."""
    a, b = pair(name)
    return [prompt([a, b]), prompt([b, a]), prompt([a, b], "{subjects}"), prompt([b, a], "{subjects}")]


# --- rendering -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placed:
    """One object of a scene: a look at a place (``x, y`` box centre, ``size`` box side, in [0, 1])."""

    traits: Traits
    size: float
    x: float
    y: float


def place_identities(
    looks: Sequence[Identity | Traits], rng: np.random.Generator, constraint: Constraint | None = None
) -> list[Placed]:
    """Random sizes and non-overlapping positions for ``looks``, as ``world.place`` draws them."""
    traits = [look.traits for look in looks]
    for t in traits:
        _check_traits(t)
    scene = place([(t.colour, t.shape) for t in traits], rng, constraint)
    return [Placed(t, o.size, o.x, o.y) for t, o in zip(traits, scene.objects)]


def render_identities(
    objects: Sequence[Placed], size: int = 32, background: tuple[int, int, int] = BACKGROUND
) -> np.ndarray:
    """The objects as an anti-aliased ``[size, size, 3]`` uint8 image. Drawn as ``world.render`` draws
    (binary at 4×, box-averaged), so a pixel is an exact mix of body, marking and background; a plain
    look gives the same pixels as ``world.render``."""
    image, _ = _render(objects, size, background)
    return image


def render_mask(objects: Sequence[Placed], size: int = 32) -> np.ndarray:
    """``[size, size]`` uint8: each pixel's coverage by the objects (255 = inside), anti-aliased."""
    _, mask = _render(objects, size, BACKGROUND)
    return mask


def _render(
    objects: Sequence[Placed], size: int, background: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    big = size * SUPERSAMPLE
    canvas = np.empty((big, big, 3), dtype=np.uint8)
    canvas[:] = background
    covered = np.zeros((big, big), dtype=bool)
    for obj in objects:
        body, marking = _masks(obj, big)
        canvas[body] = COLOURS[obj.traits.colour]
        if obj.traits.marking is not None:
            canvas[body & marking] = COLOURS[obj.traits.marking_colour]
        covered |= body
    image = np.asarray(Image.fromarray(canvas).reduce(SUPERSAMPLE))
    mask = np.asarray(Image.fromarray(covered.astype(np.uint8) * 255).reduce(SUPERSAMPLE))
    return image, mask


def _masks(obj: Placed, big: int) -> tuple[np.ndarray, np.ndarray]:
    """The object's body and marking (not yet clipped to the body) at ``big`` px, as bool masks.
    The body is drawn with exactly ``world.render``'s coordinates."""
    shape, marking = obj.traits.shape, obj.traits.marking
    half = obj.size * big / 2
    cx = obj.x * big
    x0, y0, x1, y1 = cx - half, obj.y * big - half, cx + half, obj.y * big + half
    body, mark = Image.new("1", (big, big)), Image.new("1", (big, big))
    draw = ImageDraw.Draw(body)
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=1)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=1)
    else:
        draw.polygon([(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=1)
    extent = 2 * half
    cy = y0 + (2 / 3 if shape == "triangle" else 1 / 2) * extent  # the shape's centroid
    draw = ImageDraw.Draw(mark)
    if marking == "dot":
        r = DOT_DIAMETER * extent / 2
        draw.ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=1)
    elif marking == "band":
        h = BAND_HEIGHT * extent / 2
        draw.rectangle([x0, cy - h, x1 - 1, cy + h - 1], fill=1)
    elif marking == "half":
        draw.rectangle([x0, y0, cx - 1, y1 - 1], fill=1)
    return np.asarray(body, dtype=bool), np.asarray(mark, dtype=bool)


# --- subject folders -------------------------------------------------------------------------------


def write_subject_folder(
    identity: Identity,
    folder: str | Path,
    *,
    images: int = 4,
    seed: int = 0,
    masks: bool = True,
    size: int = 32,
):
    """Write ``images`` reference images of ``identity`` (one object each, at random positions and
    sizes) as ``00.png``, ``01.png``, … with ``00.mask.png``, … beside them (white = the object,
    anti-aliased), the layout ``diffalign.subjects`` reads, and return its ``Subject``.

    Existing files of those names are an error, not overwritten: reference images are inputs.
    """
    from diffalign.subjects import Subject

    if images < 1:
        raise ValueError(f"images must be at least 1, got {images}")
    folder = Path(folder)
    names = [f"{i:02d}" for i in range(images)]
    clash = [p for n in names for p in (folder / f"{n}.png", folder / f"{n}.mask.png") if p.exists()]
    if clash:
        raise FileExistsError(
            f"{clash[0]} exists; write the subject into an empty folder (reference images are inputs)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for n in names:
        objects = place_identities([identity], rng)
        Image.fromarray(render_identities(objects, size)).save(folder / f"{n}.png")
        if masks:
            Image.fromarray(render_mask(objects, size), mode="L").save(folder / f"{n}.mask.png")
    return Subject(identity.identifier, identity.class_word, folder)


def write_pair_folders(
    name: str, root: str | Path, *, images: int = 4, seed: int = 0, masks: bool = True
) -> list:
    """The subject folders of the pair ``name``: ``root/<identity name>/`` for each of its two
    identities (different seeds, so their layouts differ) → their ``Subject``s."""
    return [
        write_subject_folder(ident, Path(root) / ident.name, images=images, seed=seed + k, masks=masks)
        for k, ident in enumerate(pair(name))
    ]


# --- the exact identity detector -------------------------------------------------------------------

MIN_LIFT = 0.15  # distance from the background (of 1) for a pixel to count; palette colours are ≥ 0.59
CORE_LEVEL = 0.5  # of an object's typical lift: at least half covered, the outline blur does not move
MIN_AREA = 0.01  # of the image, as the detector's: the smallest object covers 0.031
MIN_MARK = 0.06  # of an object's inside pixels: less of a second colour is no marking (a dot is ≥ 0.15)
MAX_MARK_DISTANCE = (
    0.3  # feature distance beyond which a second colour is in no known pattern; kinds lie 0.22–0.72 apart
)


@dataclass(frozen=True)
class IdentityDetection:
    """One object found in an image, with its traits and what it is among the listed identities.

    ``box``: (x0, y0, x1, y1) in [0, 1] image coordinates (y down); ``shape``: a ShapesWorld shape or
    ``"unknown"``; ``marking``: a kind of ``MARKINGS``, ``"unknown"`` for a second colour in no known
    pattern, or None for a plain object; ``identity``: the name of the listed identity every trait
    matches, or None; ``mixed``: no identity, but each trait is one of two listed identities and
    each of them gives a trait the other lacks (one's marking on the other's body)."""

    box: tuple[float, float, float, float]
    shape: str
    colour: str
    marking: str | None
    marking_colour: str | None
    area: float
    identity: str | None
    mixed: bool

    @property
    def traits(self) -> Traits:
        return Traits(self.shape, self.colour, self.marking, self.marking_colour)

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


def detect_identities(image, identities: Sequence[Identity]) -> list[IdentityDetection]:
    """The objects in ``image`` (as ``detector.detect`` takes it) with their traits, each matched to
    the listed ``identities``: exactly one of them, or None, and flagged mixed when it carries the
    traits of two of them."""
    found = []
    for traits, box, area in read_objects(image):
        name, mixed = match(traits, identities)
        found.append(IdentityDetection(box, *traits.slots(), area, name, mixed))
    return found


def match(traits: Traits, identities: Sequence[Identity]) -> tuple[str | None, bool]:
    """``(name, mixed)``: the identity with exactly these traits (and not mixed), else whether the
    traits are a mix of two listed identities: every trait belongs to one of the two, and each gives
    one the other lacks (A's marking on B's body; or A's shape in B's colour)."""
    slots = traits.slots()
    for i in identities:
        if i.traits.slots() == slots:
            return i.name, False
    for a, b in itertools.combinations(identities, 2):
        sa, sb = a.traits.slots(), b.traits.slots()
        if all(s in (x, y) for s, x, y in zip(slots, sa, sb)):
            only_a = any(s == x != y for s, x, y in zip(slots, sa, sb))
            only_b = any(s == y != x for s, x, y in zip(slots, sa, sb))
            if only_a and only_b:
                return None, True
    return None, False


def similarity(a: Traits | Identity, b: Traits | Identity) -> float:
    """Share of the four traits (shape, colour, marking, marking colour) two looks agree on: 1 for
    the same identity, 0.5 within a similar pair, 0 within a dissimilar one, 0.75 from a mixed
    object to either of its sources in a similar pair."""
    sa, sb = a.traits.slots(), b.traits.slots()
    return sum(x == y for x, y in zip(sa, sb)) / len(sa)


def read_objects(image) -> list[tuple[Traits, tuple[float, float, float, float], float]]:
    """Every object in ``image`` as ``(traits, box, area)`` (see the module doc for how). Never fails
    on content (blank, noise, NaN)."""
    from diffalign.shapes.detector import as_rgb, components, dilate

    rgb = as_rgb(image)  # [H, W, 3] in [0, 1]
    height, width = rgb.shape[:2]
    pixels = height * width
    chroma = rgb.max(-1) - rgb.min(-1)
    grey = chroma < 0.15
    # A generator may tint the background: measure every colour from the background it shows.
    background = np.median(rgb[grey], 0) if grey.sum() >= 0.2 * pixels else np.array(BACKGROUND) / 255
    lift = rgb - background  # [H, W, 3]
    strength = np.linalg.norm(lift, axis=-1)  # [H, W]
    candidates = components((strength >= MIN_LIFT).astype(np.int64))
    cores = np.zeros((height, width), dtype=np.int64)
    sizes = np.bincount(candidates, minlength=pixels + 1)[:-1]
    for root in np.flatnonzero(sizes >= MIN_AREA * pixels):
        member = (candidates[:-1] == root).reshape(height, width)
        cores[member & (strength >= CORE_LEVEL * np.percentile(strength[member], 90))] = 1
    labels = components(cores)
    sizes = np.bincount(labels, minlength=pixels + 1)[:-1]
    roots = np.flatnonzero(sizes >= MIN_AREA * pixels)

    directions = np.array(list(COLOURS.values()), dtype=np.float64) / 255 - background  # [6, 3]
    margin = math.ceil(0.08 * max(height, width))
    blurs = tuple(b * max(height, width) / 32 for b in (0.0, 0.5, 1.0, 1.5, 2.0))
    kept = np.isin(labels[:-1], roots).reshape(height, width)
    far = ~dilate(kept, margin)
    objects = []
    for root in roots:
        region = (labels[:-1] == root).reshape(height, width)
        valid = region | ~dilate(kept & ~region, margin)
        ys, xs = np.nonzero(region)
        top, left = max(ys.min() - margin, 0), max(xs.min() - margin, 0)
        window = (
            slice(top, min(ys.max() + margin + 1, height)),
            slice(left, min(xs.max() + margin + 1, width)),
        )
        found = _read_one(
            lift[window], valid[window], region[window], lift[far], directions, blurs, (height, width)
        )
        if found is None:
            continue
        traits, (x0, y0, x1, y1), area = found
        box = (
            float(np.clip((left + x0) / width, 0, 1)),
            float(np.clip((top + y0) / height, 0, 1)),
            float(np.clip((left + x1) / width, 0, 1)),
            float(np.clip((top + y1) / height, 0, 1)),
        )
        objects.append((traits, box, area / pixels))
    return objects


def _unmix(lift: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coverages ``[..., k]`` of the ``directions  # [k, 3]`` in ``lift  # [..., 3]``,
    and the squared residual ``[...]``. Linear (no clipping), so noise averages out downstream."""
    coef = lift @ np.linalg.pinv(directions)  # [..., k]
    residual = ((lift - coef @ directions) ** 2).sum(-1)
    return coef, residual


def _feasible_residual(lift: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Squared residual ``[n]`` of each ``lift  # [n, 3]`` from the nearest mix of one or two
    ``directions  # [k, 3]`` with coverages ≥ 0 summing to ≤ 1: the unconstrained solution when it is
    possible, else the best point on an edge of that triangle (each edge is a 1-D clip)."""
    coef, residual = _unmix(lift, directions)
    best = np.where((coef >= 0).all(-1) & (coef.sum(-1) <= 1), residual, np.inf)

    def on_segment(start: np.ndarray, end: np.ndarray) -> np.ndarray:
        step = end - start
        t = np.clip((lift - start) @ step / max(step @ step, 1e-12), 0, 1)
        return ((lift - start - t[:, None] * step) ** 2).sum(-1)

    zero = np.zeros(3)
    for d in directions:
        best = np.minimum(best, on_segment(zero, d))
    if len(directions) == 2:
        best = np.minimum(best, on_segment(directions[0], directions[1]))
    return best


def _read_one(lift, valid, region, far_lift, directions, blurs, image_size):
    """Traits, box (window pixels) and area (pixels) of the object whose core is ``region`` in this
    window, or None for too little coherent colour."""
    from diffalign.shapes.detector import MAX_EXTENT, MAX_RESIDUAL, noise_variance
    from diffalign.shapes.fit import fit_shape

    names = list(COLOURS)
    inside_core = lift[region]  # [n, 3]
    # Which colours: the physically possible mix (coverages ≥ 0 summing to ≤ 1) that explains the
    # core best. The constraint matters: red, yellow and green have no blue, so any two of them span
    # the third, and only their coverages (yellow = 0.94 red + 1.17 green) tell the wrong pair.
    hypotheses = [(i,) for i in range(len(names))] + list(itertools.combinations(range(len(names)), 2))
    errors = [_feasible_residual(inside_core, directions[list(h)]).sum() for h in hypotheses]
    single = hypotheses[int(np.argmin(errors[: len(names)]))]
    two = hypotheses[len(names) + int(np.argmin(errors[len(names) :]))]

    coef, _ = _unmix(lift, directions[list(two)])  # [h, w, 2]
    total = coef.sum(-1)
    inside = valid & (total >= 0.5)
    share = np.clip(coef, 0, None) / np.maximum(np.clip(coef, 0, None).sum(-1, keepdims=True), 1e-9)
    parts = [inside & (share[..., k] >= 0.5) for k in range(2)]
    minor = min(p.sum() for p in parts)
    # At least MIN_MARK of the inside, and 2 pixels of a 32 px image: less is an edge or noise.
    two_colours = minor >= max(MIN_MARK * inside.sum(), 2.0 * image_size[0] * image_size[1] / 1024)
    if not two_colours:
        coef, _ = _unmix(lift, directions[list(single)])
        total = coef[..., 0]
    noise = noise_variance(_unmix(far_lift, directions[list(two if two_colours else single)])[0].sum(-1))
    fit = fit_shape(total, valid, blurs, noise)
    if fit is None or fit.area < MIN_AREA * image_size[0] * image_size[1]:
        return None
    plausible = fit.extent <= MAX_EXTENT * min(image_size) and fit.residual <= MAX_RESIDUAL
    shape = fit.shape if plausible else UNKNOWN
    half = fit.extent / 2
    box = (fit.x - half, fit.y - half, fit.x + half, fit.y + half)
    if not two_colours:
        return Traits(shape, names[single[0]]), box, float(fit.area)
    best = None
    for body, mark in ((0, 1), (1, 0)):
        features = _features(parts[mark], inside, fit.x, fit.y, fit.extent)
        for kind in MARKINGS:
            distance = (
                float(np.linalg.norm(features - _prototype(shape, kind))) if shape != UNKNOWN else math.inf
            )
            if best is None or distance < best[0]:
                best = (distance, kind, body, mark)
    distance, kind, body, mark = best
    if distance > MAX_MARK_DISTANCE:
        kind = UNKNOWN
    return Traits(shape, names[two[body]], kind, names[two[mark]]), box, float(fit.area)


_WEIGHTS = np.array([1.0, 2.0, 2.0, 2.0, 2.0])  # area share; centroid offset x, y; spread x, y


def _features(marking: np.ndarray, inside: np.ndarray, x: float, y: float, extent: float) -> np.ndarray:
    """A marking region described relative to its object's box (centre ``x, y``, side ``extent``,
    pixels): its share of the object's inside, its centroid offset and its spread (standard
    deviations), so that the description does not depend on the object's size or place."""
    count = marking.sum()
    if count == 0:
        return np.full(5, 9.0)
    rows, cols = np.nonzero(marking)
    cols, rows = cols + 0.5, rows + 0.5
    return _WEIGHTS * np.array(
        [
            count / max(inside.sum(), 1),
            (cols.mean() - x) / extent,
            (rows.mean() - y) / extent,
            cols.std() / extent,
            rows.std() / extent,
        ]
    )


@functools.cache
def _prototype(shape: str, marking: str) -> np.ndarray:
    """The features of ``marking`` on ``shape``, measured on a large clean render (extent 0.5 at
    256 px) with the detector's own reading, so that drawing and reading agree by construction."""
    colour, marking_colour = "red", "cyan"
    image = render_identities([Placed(Traits(shape, colour, marking, marking_colour), 0.5, 0.5, 0.5)], 256)
    from diffalign.shapes.detector import as_rgb

    rgb = as_rgb(image)
    lift = rgb - np.array(BACKGROUND) / 255
    directions = (
        np.array([COLOURS[colour], COLOURS[marking_colour]], dtype=np.float64) / 255
        - np.array(BACKGROUND) / 255
    )
    coef, _ = _unmix(lift, directions)
    inside = coef.sum(-1) >= 0.5
    share = np.clip(coef, 0, None) / np.maximum(np.clip(coef, 0, None).sum(-1, keepdims=True), 1e-9)
    extent = 0.5 * 256
    box_y = 128.0
    return _features(inside & (share[..., 1] >= 0.5), inside, 128.0, box_y, extent)


# --- measured exactness ----------------------------------------------------------------------------


def random_traits(rng: np.random.Generator, plain: float = 0.1) -> Traits:
    """Any shape × colour × marking (plain with probability ``plain``), marking colour ≠ body colour:
    every look the detector may meet, catalogued or not."""
    names = list(COLOURS)
    shape, colour = SHAPES[rng.integers(len(SHAPES))], names[rng.integers(len(names))]
    if rng.random() < plain:
        return Traits(shape, colour)
    others = [c for c in names if c != colour]
    return Traits(shape, colour, MARKINGS[rng.integers(len(MARKINGS))], others[rng.integers(len(others))])


def degrade(image: np.ndarray, blur: float = 0.0, noise: float = 0.0, rng: np.random.Generator | None = None):
    """``image  # [H, W, 3] uint8`` blurred (Gaussian, ``blur`` px) and noised (Gaussian, ``noise`` of
    1 per channel) → ``[H, W, 3]`` float in [0, 1]: how a generator's samples differ from renders."""
    from diffalign.shapes.fit import _blur_stack

    x = image.astype(np.float64) / 255
    if blur > 0:
        h, w = x.shape[:2]
        rows, cols = _blur_stack(h, (blur,))[0], _blur_stack(w, (blur,))[0]
        # Pad with the background by blurring the lift above it, as a blurred image keeps its border.
        base = np.array(BACKGROUND) / 255
        x = np.einsum("ij,jkc,lk->ilc", rows, x - base, cols) + base
    if noise > 0:
        x = x + (rng or np.random.default_rng(0)).normal(0, noise, x.shape)
    return np.clip(x, 0, 1)


def measure_accuracy(
    n: int = 200, *, seed: int = 0, blur: float = 0.0, noise: float = 0.0, size: int = 32
) -> float:
    """Share of ``n`` random scenes (1–3 objects of ``random_traits``) whose every object's traits the
    detector reads exactly (the multiset of looks equals the truth)."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n):
        looks = [random_traits(rng) for _ in range(int(rng.integers(1, 4)))]
        image = degrade(render_identities(place_identities(looks, rng), size), blur, noise, rng)
        read = sorted(map(repr, (t for t, _, _ in read_objects(image))))
        hits += read == sorted(map(repr, looks))
    return hits / n
