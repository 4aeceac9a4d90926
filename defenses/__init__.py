"""Protecting images against malicious diffusion-based editing, as a Python API.

``protect(pipe, image, mask, method=...)`` perturbs the protected region of an image
(``mask`` = 1) so that an inpainting editor that keeps that region and repaints the rest
fails. Methods, one file each:

- ``diffusionguard``: DiffusionGuard (Choi et al., ICLR 2025), noise-prediction norm at the
  editor's first timestep, with mask augmentation;
- ``photoguard``: PhotoGuard's encoder attack (Salman et al., ICML 2023);
- ``advdm``: AdvDM (Liang et al., ICML 2023), maximal denoising loss.

All share the budget units ([0, 1] pixels), the mask convention and PGD of
``diffalign.defenses.common``; load an editor with ``diffalign.inpainting.load_inpainting``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

import torch
from diffalign.defenses import advdm, diffusionguard, photoguard
from diffalign.defenses.common import (
    MaskAugmentation,
    ProgressCallback,
    ProtectionError,
    ProtectionResult,
    augment_mask,
)
from diffusers import DiffusionPipeline

METHODS: dict[str, Callable[..., ProtectionResult]] = {
    "diffusionguard": diffusionguard.protect,
    "photoguard": photoguard.protect,
    "advdm": advdm.protect,
}

__all__ = [
    "METHODS",
    "MaskAugmentation",
    "ProgressCallback",
    "ProtectionError",
    "ProtectionResult",
    "augment_mask",
    "protect",
]


def protect(
    pipe: DiffusionPipeline,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    method: str = "diffusionguard",
    **options,
) -> ProtectionResult:
    """Protect ``mask``'s region of ``image  # [3, H, W] in [0, 1]`` with ``method`` (a key of ``METHODS``).

    ``options`` are the method's keyword arguments (``budget``, ``step_size``, ``steps``,
    ``augment``, ``generator``, ``progress`` for all; see each method's ``protect``).
    """
    if method not in METHODS:
        close = difflib.get_close_matches(method, METHODS, n=1)
        suggestion = f" Did you mean {close[0]!r}?" if close else ""
        raise ProtectionError(
            f"unknown protection method {method!r}; choose one of {', '.join(METHODS)}.{suggestion}"
        )
    function = METHODS[method]
    accepted = [
        name for name in inspect.signature(function).parameters if name not in ("pipe", "image", "mask")
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ProtectionError(
            f"{method} does not take {', '.join(unknown)}; its options are {', '.join(accepted)}."
        )
    return function(pipe, image, mask, **options)
