"""TextNorm's ``shapes`` contrast generator: every one-edit change of a ShapesWorld prompt.

Registered by name in ``diffalign/shapes/__init__.py``; the generic generators (``rules``,
``file:PATH``, ``lm:PATH``) live in ``diffalign.rewards.contrast``. Meanings are compared
with the grammar's own knowledge (``Facts.canonical``, which words every relation through its
converse as "left of" or "above"), so no relation table is kept here.
"""

from __future__ import annotations

from collections.abc import Iterator

from diffalign.rewards.contrast import ContrastError
from diffalign.shapes.grammar import (
    NUMBER_WORDS,
    RELATIONS,
    Entity,
    Facts,
    PromptOutsideGrammar,
    Relation,
    parse,
    text,
)
from diffalign.shapes.world import COLOURS, SHAPES


class ShapesContrast:
    """Every one-edit change of a ShapesWorld prompt that the grammar can state and that means
    something else: counts (to a/two/three), each other colour, each other shape, the two objects'
    colours or shapes exchanged, subject and object exchanged, every other relation, either
    object dropped.

    Meanings are compared with ``Facts.canonical()``, so "B right of A" is never offered as a
    contrast of "A left of B" (the same picture), and each meaning is offered once. A prompt
    outside the grammar is an error, not an empty set: the grammar's message says what is wrong.
    """

    name = "shapes"

    def __call__(self, prompt: str) -> list[str]:
        try:
            facts = parse(prompt)
        except PromptOutsideGrammar as error:
            raise ContrastError(
                f"{error} The 'shapes' contrast generator only knows ShapesWorld prompts; for other prompts "
                "use contrast 'rules', 'file:PATH' or 'lm:PATH'."
            ) from error
        seen = {facts.canonical()}
        contrasts = []
        for variant in _edits(facts):
            meaning = variant.canonical()
            if _valid(variant) and meaning not in seen:
                seen.add(meaning)
                contrasts.append(text(variant))
        return contrasts


def _edits(facts: Facts) -> Iterator[Facts]:
    """Candidate one-edit variants of ``facts``, some of them invalid or equivalent (filtered later)."""
    if not facts.relations:
        (entity,) = facts.entities
        for count in (1, *NUMBER_WORDS):
            yield Facts((Entity(entity.colour, entity.shape, count),))
        for variant in _entity_edits(entity):
            yield Facts((variant,))
        return
    (relation,) = facts.relations
    a, b = facts.entities[relation.subject], facts.entities[relation.object]

    def stated(first: Entity, second: Entity, rel: str = relation.relation) -> Facts:
        return Facts((first, second), (Relation(0, rel, 1),))

    for variant in _entity_edits(a):
        yield stated(variant, b)
    for variant in _entity_edits(b):
        yield stated(a, variant)
    yield stated(Entity(b.colour, a.shape), Entity(a.colour, b.shape))  # colours exchanged
    yield stated(Entity(a.colour, b.shape), Entity(b.colour, a.shape))  # shapes exchanged
    yield stated(b, a)  # subject and object exchanged
    for other in RELATIONS:
        yield stated(a, b, other)
    yield Facts((a,))
    yield Facts((b,))


def _entity_edits(entity: Entity) -> Iterator[Entity]:
    for colour in COLOURS:
        yield Entity(colour, entity.shape, entity.count)
    for shape in SHAPES:
        yield Entity(entity.colour, shape, entity.count)


def _valid(facts: Facts) -> bool:
    """Whether the grammar can state ``facts``: a relation needs two different objects."""
    return not facts.relations or facts.entities[0] != facts.entities[1]
