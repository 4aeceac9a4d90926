"""Prompt sets for training and evaluation: built-in lists shipped in the package, sets a world
registers (``diffalign.registry.register_prompt_set``), or a text file.

A prompt set is an ordered list of prompts; each training batch draws from it uniformly
with the run's seeded generator, so a resumed run draws exactly the prompts it would have.
A registered set may name the models it is written for (``unfit_for``): ShapesWorld's
``shapes-*`` prompts mean nothing to a model that has never seen the world.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from diffalign import registry
from diffalign.errors import DiffalignError

if TYPE_CHECKING:
    import torch

_PACKAGE_DIR = "prompts"
register = registry.register_prompt_set  # how a world adds its sets: prompts.register(name, load, models=...)


class PromptSetError(DiffalignError, ValueError):
    """A prompt set name or file is wrong."""


def _file_names() -> list[str]:
    folder = resources.files("diffalign").joinpath(_PACKAGE_DIR)
    return [item.name.removesuffix(".txt") for item in folder.iterdir() if item.name.endswith(".txt")]


def builtin_names() -> list[str]:
    """Names of the built-in prompt sets: the text files shipped in the package and the registered sets."""
    return sorted(_file_names() + registry.PROMPT_SETS.names())


def load_prompts(spec: str) -> list[str]:
    """The prompts of a built-in set (by name) or of a UTF-8 text file (one prompt per line).

    Blank lines and lines starting with ``#`` are skipped.
    """
    entry = registry.PROMPT_SETS.get(spec)
    if entry is not None:
        return entry.load()
    if spec in _file_names():
        text = resources.files("diffalign").joinpath(_PACKAGE_DIR, f"{spec}.txt").read_text("utf-8")
    elif Path(spec).is_file():
        try:
            text = Path(spec).read_text("utf-8")
        except UnicodeDecodeError as error:
            raise PromptSetError(
                f"prompt file {spec!r} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8"
            ) from error
    elif Path(spec).is_dir():
        raise PromptSetError(f"prompt set {spec!r} is a folder; give a .txt file with one prompt per line")
    else:
        names = builtin_names()
        raise PromptSetError(
            f"no prompt set {spec!r}: not a built-in set and not a file.{registry.suggestion(spec, names)} "
            f"Built-in sets: {', '.join(names)}; or give a .txt file with one prompt per line."
        )
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise PromptSetError(f"prompt set {spec!r} is empty")
    return prompts


def unfit_for(names: list[str], model: str) -> tuple[list[str], str]:
    """The registered sets among ``names`` whose prompts are written for other models than
    ``model``, and what they are (their world, and the models they are for)."""
    entries = [entry for entry in map(registry.PROMPT_SETS.get, names) if entry is not None]
    unfit = [entry for entry in entries if not entry.fits(model)]
    worlds = sorted({f"{e.world or 'their'} prompts (for models {', '.join(e.models or ())})" for e in unfit})
    return [entry.name for entry in unfit], "; ".join(worlds)


def display_name(spec: str) -> str:
    """A short name for a prompt set in metric keys and plots: the built-in name, or a file's stem
    (a path would put folders, and a user's home, into every metric key)."""
    return spec if spec in builtin_names() else Path(spec).stem


def draw(prompts: list[str], count: int, generator: torch.Generator) -> list[str]:
    """``count`` prompts drawn uniformly with replacement, reproducibly from ``generator``."""
    import torch

    index = torch.randint(len(prompts), (count,), generator=generator)
    return [prompts[i] for i in index.tolist()]
