"""Atomic training checkpoints: an interrupted run resumes exactly where its last checkpoint was.

A checkpoint is a folder written under a temporary name and renamed into place, and the
``latest`` pointer is replaced the same way, so a crash at any moment leaves either the old
or the new checkpoint complete, never a half-written one. A write that fails (a full disk)
removes its temporary folder at once; what a hard kill leaves behind is removed by
``remove_debris`` when the run starts or resumes (for a full Stable Diffusion UNet each
leftover is gigabytes, on a disk that may just have filled).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffalign import outputs, pipeline
from diffalign.errors import DiffalignError

LATEST = "latest"
# Temporary names of diffalign versions before the shared ``outputs`` helpers; still cleaned up.
_OLD_DEBRIS = (".tmp-epoch-*", f".{LATEST}.*")


class CheckpointError(DiffalignError, RuntimeError):
    """A checkpoint is missing or unreadable."""


def remove_debris(folder: Path) -> list[Path]:
    """Remove what interrupted checkpoint writes left in ``folder``; returns the removed paths."""
    removed = outputs.remove_debris(folder)
    for pattern in _OLD_DEBRIS:
        for leftover in Path(folder).glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def save(
    folder: Path,
    *,
    epoch: int,
    unet: torch.nn.Module,
    lora: bool,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    method_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write the state after ``epoch`` completed epochs to ``folder/epoch-NNNN`` and point ``latest`` at it.

    ``trainer_state`` is JSON (history, readable by people); ``method_state`` may hold tensors
    (value networks, replay buffers) and goes to ``method.pt``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"epoch-{epoch:04d}"
    with outputs.staging_folder(final) as staging:
        if lora:
            pipeline.save_lora(unet, staging / "lora")
        else:
            save_file(
                {k: v.contiguous() for k, v in unet.state_dict().items()}, str(staging / "unet.safetensors")
            )
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(method_state, staging / "method.pt")
        (staging / "trainer_state.json").write_text(json.dumps({"epoch": epoch, **trainer_state}), "utf-8")
    outputs.write_text(folder / LATEST, final.name)
    for old in sorted(folder.glob("epoch-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(folder: Path) -> Path | None:
    """The most recent complete checkpoint under ``folder``, or None when there is none."""
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    path = folder / pointer.read_text("utf-8").strip()
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"{pointer} points at {path}, which is not a complete checkpoint")
    return path


def load(
    path: Path, *, unet: torch.nn.Module, lora: bool, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore weights and optimizer state from ``path``; returns the trainer state (with ``epoch``,
    and the method's state under ``method``)."""
    if lora:
        pipeline.load_lora_into_adapter(unet, path / "lora")
    else:
        unet.load_state_dict(load_file(str(path / "unet.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state = json.loads((path / "trainer_state.json").read_text("utf-8"))
    state["method"] = torch.load(path / "method.pt", weights_only=True)
    return state
