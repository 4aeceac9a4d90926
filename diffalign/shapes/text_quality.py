"""FiFA's text-quality term for ShapesWorld: exact, from the grammar (``shapes-grammar``).

The world knows which prompts are well formed — the ones its grammar parses — so no language
model is needed. A prompt that parses scores 1. One that does not scores half the share of its
words the grammar knows: still below every parsed prompt (at most 0.5), but a truncated or
re-ordered caption of grammar words ranks above keyboard mash or text from another world, so the
score stays informative among broken prompts too.
"""

from __future__ import annotations

import numpy as np

from diffalign.shapes.grammar import _COUNTS, RELATIONS, PromptOutsideGrammar, parse
from diffalign.shapes.world import COLOURS, SHAPES

# Every word a grammar prompt may use (tolerated variants included: "to the left of", plurals).
VOCABULARY = frozenset(
    [*_COUNTS, *COLOURS, *SHAPES, *(f"{shape}s" for shape in SHAPES), "to", "the", "on"]
    + [word for relation in RELATIONS for word in relation.split()]
)


class GrammarQuality:
    """``prompts -> [N]``: 1 if a prompt parses, else 0.5 x the share of its words in ``VOCABULARY``."""

    name = "shapes-grammar"

    def __call__(self, prompts: list[str]) -> np.ndarray:
        return np.array([self.score(prompt) for prompt in prompts], dtype=np.float64)

    @staticmethod
    def score(prompt: str) -> float:
        try:
            parse(prompt)
            return 1.0
        except PromptOutsideGrammar:
            words = str(prompt).lower().strip().rstrip(".").split()
            return 0.5 * sum(word in VOCABULARY for word in words) / len(words) if words else 0.0
