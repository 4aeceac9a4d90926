"""Pictures a person looks at after a run: sample grids and learning curves."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; training machines have no display
import matplotlib.pyplot as plt
import torch
from PIL import Image


def to_pil(image: torch.Tensor) -> Image.Image:
    """``image  # [3, H, W] in [0, 1]`` → an 8-bit RGB PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def _save(figure, path: str | Path) -> Path:
    """Write ``figure`` as PNG (creating the folder) and free it; a suptitle keeps its own strip."""
    top = 1 - 0.3 / figure.get_figheight() if figure.get_suptitle() else 1
    figure.tight_layout(rect=(0, 0, 1, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def save_grid(
    images: torch.Tensor,
    captions: Sequence[str],
    path: str | Path,
    *,
    scores: Sequence[float] | None = None,
    title: str = "",
    columns: int = 4,
) -> Path:
    """A captioned grid of ``images  # [N, 3, H, W]`` (with scores when given) saved as PNG."""
    count = len(images)
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index >= count:
            continue
        axis.imshow(to_pil(images[index]), interpolation="nearest")
        label = "\n".join(textwrap.wrap(captions[index], 24)[:2])
        if scores is not None:
            label += f"\n{scores[index]:.3g}"
        axis.set_title(label, fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    return _save(figure, path)


def save_curves(
    history: Sequence[dict],
    keys: Sequence[str],
    path: str | Path,
    *,
    x: str = "samples_seen",
    title: str = "",
) -> Path:
    """Plot ``keys`` of per-epoch metric records against ``x`` (mean ± std where ``key_std`` exists)."""
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for key in keys:
        records = [record for record in history if key in record]
        if not records:
            continue
        xs = [record[x] for record in records]
        ys = torch.tensor([float(record[key]) for record in records])
        axis.plot(xs, ys.tolist(), marker="o", markersize=3, label=key)
        spread_key = key.replace("_mean", "_std")
        if spread_key != key and all(spread_key in record for record in records):
            spread = torch.tensor([float(record[spread_key]) for record in records])
            axis.fill_between(xs, (ys - spread).tolist(), (ys + spread).tolist(), alpha=0.15)
    axis.set_xlabel(x.replace("_", " "))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title, fontsize=9)
    return _save(figure, path)
