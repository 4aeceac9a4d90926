"""Optimisation methods; each one lives in a file named after it."""

from diffalign.optim.ddpo import DDPO, PerPromptStatTracker, TrainingDiverged

METHOD_CLASSES = {"ddpo": DDPO}

__all__ = ["DDPO", "METHOD_CLASSES", "PerPromptStatTracker", "TrainingDiverged"]
