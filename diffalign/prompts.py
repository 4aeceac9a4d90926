"""Prompt sets for training and evaluation: built-in lists shipped in the package, or a text file.

A prompt set is an ordered list of prompts; each training batch draws from it uniformly
with the run's seeded generator, so a resumed run draws exactly the prompts it would have.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

import torch

from diffalign.errors import DiffalignError

_PACKAGE_DIR = "prompts"


class PromptSetError(DiffalignError, ValueError):
    """A prompt set name or file is wrong."""


def builtin_names() -> list[str]:
    """Names of the prompt sets shipped in the package (text files, and ShapesWorld's grammar)."""
    from diffalign.shapes.splits import PROMPT_SETS

    folder = resources.files("diffalign").joinpath(_PACKAGE_DIR)
    files = [item.name.removesuffix(".txt") for item in folder.iterdir() if item.name.endswith(".txt")]
    return sorted(files + list(PROMPT_SETS))


def load_prompts(spec: str) -> list[str]:
    """The prompts of a built-in set (by name) or of a UTF-8 text file (one prompt per line).

    Blank lines and lines starting with ``#`` are skipped.
    """
    from diffalign.shapes.splits import PROMPT_SETS, prompt_set

    if spec in PROMPT_SETS:
        return prompt_set(spec)
    if spec in builtin_names():
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
        close = difflib.get_close_matches(spec, builtin_names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PromptSetError(
            f"no prompt set {spec!r}: not a built-in set and not a file.{hint} "
            f"Built-in sets: {', '.join(builtin_names())}; or give a .txt file with one prompt per line."
        )
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise PromptSetError(f"prompt set {spec!r} is empty")
    return prompts


def display_name(spec: str) -> str:
    """A short name for a prompt set in metric keys and plots: the built-in name, or a file's stem
    (a path would put folders, and a user's home, into every metric key)."""
    return spec if spec in builtin_names() else Path(spec).stem


def draw(prompts: list[str], count: int, generator: torch.Generator) -> list[str]:
    """``count`` prompts drawn uniformly with replacement, reproducibly from ``generator``."""
    index = torch.randint(len(prompts), (count,), generator=generator)
    return [prompts[i] for i in index.tolist()]
