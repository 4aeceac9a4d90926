"""Reward models for diffalign (installed as ``diffalign.rewards``).

``build(name, **options)`` makes a reward by its registry name; ``available()`` lists them.
Importing this package registers every built-in reward, and the ``textnorm(...)`` wrapper
(``TextNorm``, Kim et al. 2024), so ``build("textnorm(shapes-clip)", c=20)`` works too.
"""

from diffalign.rewards.base import (
    CandidateReward,
    Reward,
    RewardError,
    RewardInfo,
    available,
    build,
    checked_call,
    info,
    register,
    register_wrapper,
)
from diffalign.rewards.checkpoints import TINY_RANDOM, MissingCheckpointError

# Importing these modules registers their rewards.
from diffalign.rewards import aesthetic, clip_score, compression, hpsv2, pickscore, shapes  # noqa: F401
from diffalign.rewards import blip2, imagereward  # noqa: F401
from diffalign.rewards.contrast import ContrastError
from diffalign.rewards.textnorm import TextNorm, TextNormError

__all__ = [
    "TINY_RANDOM",
    "CandidateReward",
    "ContrastError",
    "MissingCheckpointError",
    "Reward",
    "RewardError",
    "RewardInfo",
    "TextNorm",
    "TextNormError",
    "available",
    "build",
    "checked_call",
    "info",
    "register",
    "register_wrapper",
]
