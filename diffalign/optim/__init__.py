"""Optimisation methods: one module each, found by the config's ``method`` key.

Every module of this package registers its method when imported, and importing the package
imports them all, so adding a method is **one file plus one preset**: the training loop,
checkpoints, evaluation, config keys, validation and the CLI's help come from the contract
(``diffalign.optim.base.Method``). For example ``diffalign/optim/last_step.py``, reward
backpropagation through the final denoising step only (AlignProp with K = 1)::

    from dataclasses import dataclass

    from diffalign.config import ConfigError, doc
    from diffalign.optim.alignprop import AlignProp, GradientWindow
    from diffalign.optim.base import register


    @dataclass
    class LastStepSection:
        \"\"\"Its keys, under ``last_step.`` in configs (``--set last_step.reward_scale=2``).\"\"\"

        reward_scale: float = doc(1.0, "the loss is -reward_scale x mean reward")

        def validate(self, config) -> None:  # its own keys, checked at load
            if self.reward_scale <= 0:
                raise ConfigError(f"last_step.reward_scale must be positive, got {self.reward_scale}")


    @register
    class LastStep(AlignProp):
        name = "last_step"  # method=last_step, and the config section's key
        description = "LastStep (an example): reward gradients through the final step alone"
        section = LastStepSection
        needs_differentiable_reward = True  # checked against the configured reward at load

        @classmethod
        def validate(cls, config) -> None:  # rules that hold when it is the chosen method
            pass

        @property
        def reward_scale(self) -> float:
            return self.config.last_step.reward_scale

        def window(self, generator) -> GradientWindow:
            return GradientWindow(steps=1, checkpointed=False)

and ``diffalign/presets/last_step.yaml`` (``method: last_step`` and the keys it changes). Then
``diffalign train --set method=last_step`` runs it. A method written from scratch implements
``accumulation_steps``, ``run_epoch(generator)``, ``state_dict`` and ``load_state_dict`` (see
``ddpo.py``), with the shared parts from ``base.py``: ``sample_rollouts``, ``check_finite``,
``clip_and_step``, ``reward_metrics``, ``mean_over_processes``. A method defined outside the
package registers the same way when its module is imported, and may name its own preset file
(``preset = "path/to/preset.yaml"``).
"""

from __future__ import annotations

import importlib
import pkgutil

from diffalign.optim.base import (
    Method,
    MethodError,
    MethodInfo,
    TrainContext,
    TrainingDiverged,
    lookup,
    register,
    registered,
)

# Every module beside base.py is a method: importing it registers it.
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

from diffalign.optim.alignprop import AlignProp  # imported above; named for users
from diffalign.optim.ddpo import DDPO, PerPromptStatTracker
from diffalign.optim.dpok import DPOK
from diffalign.optim.grpo import GRPO
from diffalign.optim.refl import ReFL


def available() -> list[MethodInfo]:
    """Every registered method, in the order the CLI lists them."""
    return list(registered().values())


def names() -> list[str]:
    return list(registered())


def get(name: str) -> MethodInfo:
    """The method registered as ``name``; an unknown name is a ``MethodError`` with the closest one."""
    return lookup(name)


__all__ = [
    "DDPO",
    "DPOK",
    "GRPO",
    "AlignProp",
    "Method",
    "MethodError",
    "MethodInfo",
    "PerPromptStatTracker",
    "ReFL",
    "TrainContext",
    "TrainingDiverged",
    "available",
    "get",
    "names",
    "register",
]
