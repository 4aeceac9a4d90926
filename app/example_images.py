"""The app's example images: ShapesWorld scenes, each with a mask over the one object to protect.

They are ShapesWorld renders at the ShapesWorld pipelines' 32 px, so that the default model
(``shapes-inpaint``) sees what it was trained on, and they are shipped as PNGs in
``app/examples/`` (package data) rather than rendered at start-up, so that the app shows
exactly the pictures that were looked at. Regenerate them with
``python -m diffalign.app.example_images``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffalign.shapes import grammar, world

FOLDER = Path(__file__).parent / "examples"
SIZE = 32  # the ShapesWorld pipelines' native side
# The mask reaches this far (fraction of the image side) beyond the protected object's box,
# so the object's blurred edge is protected too.
MARGIN = 0.04


@dataclass(frozen=True)
class Example:
    name: str
    scene: str  # a ShapesWorld prompt the picture shows; its first object is the protected one
    attack: str  # what an editor that keeps that object is asked to paint around it


EXAMPLES = (
    Example("red-circle", "a red circle left of a blue square", "a red circle left of a yellow triangle"),
    Example(
        "green-triangle", "a green triangle above a purple circle", "a green triangle above a cyan square"
    ),
    Example(
        "yellow-square", "a yellow square right of a cyan circle", "a yellow square right of a red triangle"
    ),
)


def make(folder: Path = FOLDER, size: int = SIZE, seed: int = 0) -> list[Path]:
    """Render every example and its mask (white = protect) into ``folder``; the written paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for example in EXAMPLES:
        scene = grammar.scene_for(example.scene, rng)
        protected = scene.objects[0]
        half = protected.size / 2 + MARGIN
        rows = (np.arange(size) + 0.5) / size  # pixel centres in [0, 1] image coordinates
        inside_y = np.abs(rows - protected.y) <= half
        inside_x = np.abs(rows - protected.x) <= half
        mask = (inside_y[:, None] & inside_x[None, :]).astype(np.uint8) * 255
        image_path, mask_path = paths(example, folder)
        Image.fromarray(world.render(scene, size)).save(image_path)
        Image.fromarray(mask).save(mask_path)
        written += [image_path, mask_path]
    return written


def paths(example: Example, folder: Path = FOLDER) -> tuple[Path, Path]:
    """The example's image and mask files."""
    return folder / f"{example.name}.png", folder / f"{example.name}-mask.png"


if __name__ == "__main__":
    for path in make():
        print(path)
