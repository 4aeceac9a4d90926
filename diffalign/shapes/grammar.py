"""The ShapesWorld caption language: prompts ↔ structured facts ↔ scenes.

Three kinds of prompt, all lower case:

- single:   "a red circle"
- count:    "two red circles", "three blue squares" (all objects the same colour and shape)
- relation: "a red circle left of a blue square" (left of, right of, above, below; two
  objects of different colour or shape)

``parse`` turns a prompt into ``Facts``, ``text`` turns facts back into the canonical
prompt, ``scene_for`` samples a scene that makes the facts true, and ``caption`` words a
scene. Spatial relations compare bounding-box centres: "A left of B" means B's centre is
further right of A's than it is above or below it (the displacement is within 45° of the
axis). Generated scenes satisfy it by a wide margin (the boxes are disjoint along the axis
and the displacement is within 27° of it) so that detection error never flips it.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import numpy as np

from diffalign.errors import DiffalignError
from diffalign.shapes.world import COLOURS, GAP, SHAPES, Scene, place

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
KINDS: tuple[str, ...] = ("single", "count", "relation")
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three"}
_COUNTS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "1": 1, "two": 2, "2": 2, "three": 3, "3": 3}
# "A right of B" is "B left of A": each relation's converse, used to compare meanings.
_CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_EXAMPLES = "'a red circle', 'two blue squares' or 'a red circle left of a blue square'"
_RELATION_RE = re.compile(r"^(?P<a>.+?) (?:to the |on the )?(?P<rel>left of|right of|above|below) (?P<b>.+)$")


class PromptOutsideGrammar(DiffalignError, ValueError):
    """A prompt the ShapesWorld grammar cannot express."""


@dataclass(frozen=True)
class Entity:
    """``count`` objects of one colour and shape."""

    colour: str
    shape: str
    count: int = 1


@dataclass(frozen=True)
class Relation:
    """``entities[subject]`` is ``relation`` ``entities[object]`` (e.g. left of)."""

    subject: int
    relation: str
    object: int


@dataclass(frozen=True)
class Facts:
    """What a prompt requires: these entities (and nothing else) and these relations."""

    entities: tuple[Entity, ...]
    relations: tuple[Relation, ...] = ()

    @property
    def kind(self) -> str:
        """ "relation", "count" or "single"."""
        if self.relations:
            return "relation"
        return "count" if any(e.count > 1 for e in self.entities) else "single"

    @property
    def pairs(self) -> frozenset[tuple[str, str]]:
        """The ``(colour, shape)`` compositions the prompt mentions."""
        return frozenset((e.colour, e.shape) for e in self.entities)

    def canonical(self) -> Facts:
        """The same meaning in one fixed wording (only "left of"/"above", subject first),
        so that "A right of B" and "B left of A" compare equal."""
        if self.kind != "relation":
            return self
        (rel,) = self.relations
        if rel.relation in ("left of", "above"):
            return self
        swapped = (self.entities[rel.object], self.entities[rel.subject])
        return Facts(swapped, (Relation(0, _CONVERSE[rel.relation], 1),))


def parse(prompt: str) -> Facts:
    """The facts a prompt states; ``PromptOutsideGrammar`` names the part it cannot read.

    Case, surrounding spaces, a final full stop, "an"/"one"/digits for counts, singular or
    plural nouns and "to the left of" are tolerated, so hand-written prompts work too.
    """
    normal = " ".join(str(prompt).lower().strip().rstrip(".").split())
    match = _RELATION_RE.match(normal)
    if match is None:
        return Facts((_noun_phrase(normal, prompt),))
    a, b = _noun_phrase(match["a"], prompt), _noun_phrase(match["b"], prompt)
    if a.count != 1 or b.count != 1:
        raise _outside(prompt, "relations are between single objects ('a …', not 'two …')")
    if a == b:
        raise _outside(
            prompt, f"a relation between two identical objects is ambiguous; say 'two {a.colour} {a.shape}s'"
        )
    return Facts((a, b), (Relation(0, match["rel"], 1),))


def text(facts: Facts) -> str:
    """The prompt that states ``facts`` (``parse(text(f)) == f``)."""
    words = [_words(e) for e in facts.entities]
    if not facts.relations:
        return words[0]
    (rel,) = facts.relations
    return f"{words[rel.subject]} {rel.relation} {words[rel.object]}"


def converse(relation: str) -> str:
    """The relation that swaps subject and object: "A left of B" is "B right of A"."""
    return _CONVERSE[relation]


def holds(relation: str, subject: tuple[float, float], obj: tuple[float, float]) -> bool:
    """Whether the thing centred at ``subject`` is ``relation`` the thing centred at ``obj``."""
    along, across = _offsets(relation, subject, obj)
    return along > abs(across)


def scene_for(facts: Facts | str, rng: np.random.Generator) -> Scene:
    """A random scene of which ``facts`` (or a prompt) are exactly true: the required objects,
    nothing else, at random sizes and positions that satisfy the relation clearly."""
    facts = parse(facts) if isinstance(facts, str) else facts
    kinds = [(e.colour, e.shape) for e in facts.entities for _ in range(e.count)]
    if not facts.relations:
        return place(kinds, rng)
    (rel,) = facts.relations

    def clear(centres: np.ndarray, sizes: np.ndarray) -> bool:
        s, o = rel.subject, rel.object
        along, across = _offsets(rel.relation, centres[s], centres[o])
        return along >= (sizes[s] + sizes[o]) / 2 + GAP and abs(across) <= along / 2

    return place(kinds, rng, constraint=clear)


def describe(scene: Scene, rng: np.random.Generator) -> Facts:
    """The facts of a scene the grammar can word: one object, 2–3 identical objects, or two
    different objects (``rng`` picks which is the subject of the relation)."""
    objects = scene.objects
    kinds = {(o.colour, o.shape) for o in objects}
    if len(kinds) == 1 and len(objects) in (1, *NUMBER_WORDS):
        ((colour, shape),) = kinds
        return Facts((Entity(colour, shape, len(objects)),))
    if len(objects) == 2:
        a, b = objects if rng.random() < 0.5 else objects[::-1]
        dx, dy = b.x - a.x, b.y - a.y
        if abs(dx) >= abs(dy):
            relation = "left of" if dx > 0 else "right of"
        else:
            relation = "above" if dy > 0 else "below"
        return Facts((Entity(a.colour, a.shape), Entity(b.colour, b.shape)), (Relation(0, relation, 1),))
    raise ValueError(
        f"the grammar cannot describe a scene of {len(objects)} objects of {len(kinds)} kinds: it words "
        "one object, two or three identical objects, or two different objects"
    )


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A prompt that is true of ``scene`` (see ``describe`` for which scenes have one)."""
    return text(describe(scene, rng))


def _offsets(relation: str, subject, obj) -> tuple[float, float]:
    """Displacement from subject to object along the relation's axis (positive when the
    relation holds) and across it."""
    dx, dy = obj[0] - subject[0], obj[1] - subject[1]
    return {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]


def _words(entity: Entity) -> str:
    if entity.count == 1:
        return f"a {entity.colour} {entity.shape}"
    return f"{NUMBER_WORDS[entity.count]} {entity.colour} {entity.shape}s"


def _noun_phrase(phrase: str, prompt: str) -> Entity:
    words = phrase.split()
    if len(words) != 3:
        raise _outside(prompt, f"expected '<a|two|three> <colour> <shape>' but found {phrase!r}")
    count_word, colour, noun = words
    if count_word not in _COUNTS:
        raise _outside(prompt, f"{count_word!r} is not a count; use a, two or three")
    if colour not in COLOURS:
        raise _outside(
            prompt,
            f"unknown colour {colour!r}{_did_you_mean(colour, COLOURS)}; colours are {', '.join(COLOURS)}",
        )
    shape = noun[:-1] if noun.endswith("s") and noun[:-1] in SHAPES else noun
    if shape not in SHAPES:
        raise _outside(
            prompt, f"unknown shape {noun!r}{_did_you_mean(noun, SHAPES)}; shapes are {', '.join(SHAPES)}"
        )
    return Entity(colour, shape, _COUNTS[count_word])


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _outside(prompt: str, problem: str) -> PromptOutsideGrammar:
    return PromptOutsideGrammar(
        f"cannot parse ShapesWorld prompt {prompt!r}: {problem}. Valid prompts look like {_EXAMPLES}."
    )
