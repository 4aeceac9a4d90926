"""Train and held-out compositions of ShapesWorld, the prompt sets and the training data.

Four colour–shape pairs never occur in training captions. Every colour and every shape
still occurs in training (each with at least four partners), so a held-out prompt asks for
a new *combination* of known words: compositional generalisation, not new vocabulary.
The held-out split is every prompt that mentions at least one held-out pair; the train
split is every other prompt. Lists are built in a fixed order, so they are identical on
every machine and in every process.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from functools import cache
from itertools import permutations

import numpy as np

from diffalign.shapes import PROMPT_SETS  # name -> (split, kind), registered by the package
from diffalign.shapes.grammar import (
    KINDS,
    NUMBER_WORDS,
    RELATIONS,
    Entity,
    Facts,
    Relation,
    caption,
    scene_for,
    text,
)
from diffalign.shapes.world import COLOURS, SHAPES, render

# (colour, shape); red and cyan keep all their shapes so that the documentation's example
# "a red circle left of a blue square" is a training prompt.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("green", "triangle"), ("blue", "circle"), ("yellow", "square"), ("purple", "square")}
)
SPLITS: tuple[str, ...] = ("train", "heldout")

# Kinds of training caption and their shares: relations carry most of the compositional
# signal (binding colour to shape, and position), counts are the rarest skill to need.
TRAINING_MIX: dict[str, float] = {"single": 0.4, "count": 0.2, "relation": 0.4}


def prompts(split: str = "train", kind: str = "all") -> list[str]:
    """The prompts of a split (``train`` or ``heldout``) and kind (``single``, ``count``,
    ``relation`` or ``all``), in a fixed order."""
    return [text(f) for f in _facts(split, kind)]


def prompt_set(name: str) -> list[str]:
    """A named prompt set for the prompt registry: one of ``PROMPT_SETS`` (the train split
    unless the name says heldout)."""
    if name not in PROMPT_SETS:
        close = difflib.get_close_matches(name, list(PROMPT_SETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"no ShapesWorld prompt set {name!r}.{hint} Sets: {', '.join(PROMPT_SETS)}")
    return prompts(*PROMPT_SETS[name])


def training_pairs(n: int, rng: np.random.Generator, size: int = 32) -> Iterator[tuple[np.ndarray, str]]:
    """``n`` random ``(image [size, size, 3] uint8, caption)`` pairs built only from train
    compositions, kinds mixed as in ``TRAINING_MIX``, uniform over the prompts of a kind."""
    kinds = list(TRAINING_MIX)
    shares = np.array(list(TRAINING_MIX.values()))
    for _ in range(n):
        pool = _facts("train", kinds[rng.choice(len(kinds), p=shares)])
        scene = scene_for(pool[rng.integers(len(pool))], rng)
        yield render(scene, size), caption(scene, rng)


@cache
def _facts(split: str, kind: str) -> tuple[Facts, ...]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    if kind not in (*KINDS, "all"):
        raise ValueError(f"unknown prompt kind {kind!r}; kinds are {', '.join(KINDS)} or all")
    if kind == "all":
        return tuple(f for k in KINDS for f in _facts(split, k))
    heldout = split == "heldout"
    return tuple(f for f in _all_facts(kind) if bool(f.pairs & HELDOUT_PAIRS) == heldout)


def _all_facts(kind: str) -> list[Facts]:
    """Every prompt of a kind the grammar can state, in a fixed order."""
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    if kind == "single":
        return [Facts((Entity(c, s),)) for c, s in pairs]
    if kind == "count":
        return [Facts((Entity(c, s, n),)) for c, s in pairs for n in NUMBER_WORDS]
    return [
        Facts((Entity(*a), Entity(*b)), (Relation(0, rel, 1),))
        for a, b in permutations(pairs, 2)
        for rel in RELATIONS
    ]
