"""Subjects to personalise a model on: a few images of one thing, an identifier and a class word.

CONTRACT (skeleton; ``load_subjects`` and validation are being written).

A subject is given as a folder of a few images (optionally a mask per image, ``NAME.mask.png``
beside ``NAME.png``, white = the subject) with an identifier and a class word — ``olis toy``,
``hta dog`` — as DreamBooth (Ruiz et al. 2023) and MuDI (Jang et al. 2024) name them. The
identifier is a rare token the prompt uses for the subject; the class word is what it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from diffalign.errors import DiffalignError


class SubjectError(DiffalignError, ValueError):
    """A subject cannot be used as given (empty folder, unreadable image, mask of another size,
    identifier colliding with a common word or another subject); nothing was written."""


@dataclass(frozen=True)
class Subject:
    """One subject as the user names it."""

    identifier: str  # "olis"
    class_word: str  # "toy"
    folder: Path

    @property
    def token(self) -> str:
        """How prompts name it: ``"olis toy"``."""
        return f"{self.identifier} {self.class_word}"


@dataclass
class SubjectImages:
    """A subject's reference images (RGB) and their masks (mode "L", white = subject; None when the
    user gave none and no segmentation model has made one yet)."""

    subject: Subject
    images: list[Image.Image]
    masks: list[Image.Image | None] = field(default_factory=list)


def load_subjects(specs: list[tuple[str, str, str | Path]]) -> list[SubjectImages]:
    """``[(identifier, class_word, folder), ...]`` → the subjects' images and masks, validated."""
    raise NotImplementedError
