"""Reward models for diffalign (installed as ``diffalign.rewards``).

``build(name, **options)`` makes a reward by its registry name; ``available()`` lists them.
Importing this package registers every built-in reward.
"""

from diffalign.rewards.base import (
    Reward,
    RewardError,
    RewardInfo,
    available,
    build,
    checked_call,
    info,
    register,
)
from diffalign.rewards.checkpoints import TINY_RANDOM, MissingCheckpointError

# Importing these modules registers their rewards.
from diffalign.rewards import aesthetic, clip_score, compression, hpsv2, pickscore, shapes  # noqa: F401

__all__ = [
    "TINY_RANDOM",
    "MissingCheckpointError",
    "Reward",
    "RewardError",
    "RewardInfo",
    "available",
    "build",
    "checked_call",
    "info",
    "register",
]
