"""Where a reward's weights come from: a local file, the Hugging Face cache, or a seeded tiny init.

diffalign never downloads weights itself: every loader reads local files only, so a run
behaves the same with or without a network and never stalls on a hub. When weights are
absent, the error names the missing file or model, the command that fetches it on a machine
with internet, and the ``build(...)`` option that points the reward at a copy.

``checkpoint="tiny-random"`` asks every model reward for a small randomly initialised model
of the same classes, seeded, so tests and CPU smoke runs exercise the real code path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from diffalign.rewards.base import RewardError
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError

TINY_RANDOM = "tiny-random"
TINY_SEED = 0


class MissingCheckpointError(RewardError):
    """A reward's weights are not on this machine; the message says which and how to get them."""

    def __init__(
        self,
        *,
        reward: str,
        missing: str,
        looked_in: str,
        download: str,
        option: str,
        example: str,
        hub_cache: bool = False,
    ):
        self.reward = reward
        self.missing = missing
        where = (
            "either keep it in the Hugging Face cache (copy the cache folder, or set HF_HOME), where it is\n"
            f"     found without options, or pass its location: build({reward!r}, {option}={example!r})"
            if hub_cache
            else f"pass its location: build({reward!r}, {option}={example!r})"
        )
        super().__init__(
            f"reward {reward!r} needs {missing}, which is not in {looked_in} "
            "(diffalign reads local files only and never downloads weights). To provide it:\n"
            f"  1. on a machine with internet run:  {download}\n"
            f"  2. bring the result here and {where}\n"
            f"For tests and CPU smoke runs, build({reward!r}, checkpoint={TINY_RANDOM!r}) makes a small "
            "randomly initialised model of the same classes instead."
        )


def existing_file(path: str | Path, *, reward: str, download: str, option: str = "checkpoint") -> Path:
    """``path`` itself, after checking it is a file (so a typo fails before any model is built)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingCheckpointError(
            reward=reward,
            missing=f"the file {path.name!r}",
            looked_in=str(path.parent),
            download=download,
            option=option,
            example=str(path),
        )
    return path


def cached_hub_file(repo_id: str, filenames: list[str], *, reward: str, option: str = "checkpoint") -> Path:
    """The first of ``filenames`` found for ``repo_id`` in the local Hugging Face cache.

    ``filenames`` lists equivalent spellings in order of preference (e.g. a ``.safetensors``
    file before its pickled ``.bin`` twin); the error asks for the last, the one every repo has.
    """
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=True))
        except LocalEntryNotFoundError:
            continue
    raise MissingCheckpointError(
        reward=reward,
        missing=f"{filenames[-1]!r} from the Hugging Face repo {repo_id!r}",
        looked_in=f"the Hugging Face cache at {constants.HF_HUB_CACHE}",
        download=f"hf download {repo_id} {filenames[-1]}",
        option=option,
        example=f"/path/to/{filenames[-1]}",
        hub_cache=True,
    )


@contextlib.contextmanager
def seeded(seed: int = TINY_SEED) -> Iterator[None]:
    """Make random initialisation inside the block reproducible without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
