"""Optimisation methods, each in its own module, looked up by the config's ``method`` key."""

from diffalign.optim.alignprop import AlignProp
from diffalign.optim.base import TrainingDiverged
from diffalign.optim.ddpo import DDPO, PerPromptStatTracker
from diffalign.optim.dpok import DPOK

METHOD_CLASSES = {"ddpo": DDPO, "dpok": DPOK, "alignprop": AlignProp}

__all__ = ["DDPO", "DPOK", "AlignProp", "METHOD_CLASSES", "PerPromptStatTracker", "TrainingDiverged"]
