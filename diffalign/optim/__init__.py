"""Optimisation methods, each in its own module, looked up by the config's ``method`` key."""

from diffalign.optim.alignprop import AlignProp
from diffalign.optim.base import TrainingDiverged
from diffalign.optim.ddpo import DDPO, PerPromptStatTracker
from diffalign.optim.dpok import DPOK
from diffalign.optim.grpo import GRPO
from diffalign.optim.refl import ReFL

METHOD_CLASSES = {"ddpo": DDPO, "grpo": GRPO, "dpok": DPOK, "alignprop": AlignProp, "refl": ReFL}

__all__ = ["DDPO", "GRPO", "DPOK", "AlignProp", "ReFL", "METHOD_CLASSES", "PerPromptStatTracker", "TrainingDiverged"]
