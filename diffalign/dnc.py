"""Detect-and-Compare (D&C; Jang et al., MuDI, NeurIPS 2024, arXiv 2404.04243): does a generated
image show every subject, each once, without mixing their identities?

CONTRACT (skeleton; being written).

For an image and N subjects: detect the objects of the subjects' classes; embed each detection and
each subject's reference images; S_det[i, j] = similarity of detection i to subject j (mean over
j's references), S_ref[j, k] = similarity of subject j's references to subject k's. D&C = 1 − ‖S_det −
S_ref‖ (a normalised distance between the two matrices; rows of S_det matched to subjects), and 0
when the number of detections differs from N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from diffalign.subjects import SubjectImages


@dataclass(frozen=True)
class DnCResult:
    """One image's verdict."""

    dnc: float  # the D&C score in [0, 1]
    detections: int  # objects of the subjects' classes found
    all_present: bool  # every subject found, each once
    mixed: bool | None  # a detection carries traits of two subjects (None: the scorer cannot tell)


class DnCScorer(Protocol):
    """Scores generated images against the subjects (real: a detector + an image embedder;
    ShapesWorld: the exact identity detector)."""

    name: str

    def __call__(self, images: torch.Tensor, subjects: list[SubjectImages]) -> list[DnCResult]:
        """``images  # [B, 3, H, W]`` in [0, 1] → one result per image."""
        ...
