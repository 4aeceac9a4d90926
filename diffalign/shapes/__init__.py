"""ShapesWorld, diffalign's embedded default world: coloured shapes with compositional
captions ("a red circle left of a blue square") and an exact detector that measures how
well a generated image matches its prompt.

- ``world``: objects, scenes, random sampling, anti-aliased rendering.
- ``grammar``: prompts ↔ ``Facts`` ↔ scenes (``parse``, ``text``, ``caption``, ``scene_for``).
- ``splits``: train / held-out compositions, prompt sets, training pairs.
- ``detector``: objects from pixels (``detect``) and prompt fit (``score``, ``score_batch``).
- ``fit``: the detector's shape classifier (blurred templates fitted to a blob).
- ``accuracy``: the detector's measured exactness and speed.
"""

from diffalign.shapes.detector import Detection, correct, detect, score, score_batch
from diffalign.shapes.grammar import (
    Entity,
    Facts,
    PromptOutsideGrammar,
    Relation,
    caption,
    parse,
    scene_for,
    text,
)
from diffalign.shapes.splits import HELDOUT_PAIRS, PROMPT_SETS, prompt_set, prompts, training_pairs
from diffalign.shapes.world import COLOURS, SHAPES, Obj, Scene, random_scene, render

__all__ = [
    "COLOURS",
    "HELDOUT_PAIRS",
    "PROMPT_SETS",
    "SHAPES",
    "Detection",
    "Entity",
    "Facts",
    "Obj",
    "PromptOutsideGrammar",
    "Relation",
    "Scene",
    "caption",
    "correct",
    "detect",
    "parse",
    "prompt_set",
    "prompts",
    "random_scene",
    "render",
    "scene_for",
    "score",
    "score_batch",
    "text",
    "training_pairs",
]
