"""shapes-TIA: a TIA2-format alignment benchmark built from ShapesWorld, labelled by its exact detector.

TIA2 (Kim et al., "Confidence-aware reward optimization for fine-tuning text-to-image
models", ICLR 2024) asks humans whether generated images match their prompts. Its images
and labels cannot be downloaded here, so diffalign ships a stand-in with the same layout
(``tia2.py`` reads both): prompts of the ShapesWorld grammar, images from the shipped
ShapesWorld pipeline, and three "annotator" labels per image derived from the detector,
which knows the truth.

Subsets, as in TIA2:

- ``comprehensive``: single-object, count and relation prompts, train and held-out
  compositions, taken in turn from the six (split, kind) pools;
- ``counting``: count prompts ("three blue squares"), train and held-out in turn;
- ``composition``: relation prompts ("a red circle left of a blue square"), likewise.

Images: DDIM with η = 1, each prompt's images cycling through a spread of guidance scales,
so that most prompts get both right and wrong images (on the shipped model, low guidance
breaks counts and relations, held-out compositions fail often at any guidance).

Labels. The detector's score is the fraction of the prompt's facts that hold (objects,
counts, relation, and no unrequested objects; see ``diffalign.shapes.detector``). The clean
label is 1 (aligned) when every fact holds, -1 (misaligned) when at most half hold, and 0
(unsure) in between: the "mostly right" images (two of three squares, the right objects in
the wrong relation) on which human annotators split. Each of the three annotators keeps the
clean label, or with probability ``noise`` gives one of the other two labels at random,
independently and seeded: disagreement like TIA2's, with a known rate.

``ensure()`` builds the default set once into ``$DIFFALIGN_CACHE/shapes-tia/<version>-<hash>/``
(default ``~/.cache/diffalign``); ``make(folder)`` writes one where you choose
(``diffalign bench shapes-tia --output DIR``). Both build in a temporary folder and rename it
into place, so a folder that exists is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffalign import outputs
from diffalign.config import doc
from diffalign.errors import DiffalignError
from diffalign.shapes.grammar import KINDS
from diffalign.shapes.splits import SPLITS
from diffalign.shapes.splits import prompts as split_prompts

# Bump when the recipe changes (prompt drawing, labelling, file layout): cached sets of an
# older version are then rebuilt instead of reused.
VERSION = 1
NAME = "shapes-tia"  # what ``tia2.load`` and ``diffalign bench tia2 --data`` call the built-in set
SUBSETS: tuple[str, ...] = ("comprehensive", "counting", "composition")
LABELS: tuple[int, ...] = (1, 0, -1)
# Images per sampling call. Part of the recipe: the batch shapes decide how the seeded noise
# stream is cut, so changing it changes the images.
_BATCH = 32


class ShapesTiaError(DiffalignError, ValueError):
    """A shapes-TIA setting or output folder is wrong; the message says how to fix it."""


@dataclass(frozen=True)
class ShapesTiaConfig:
    """How shapes-TIA is built; every field is part of the cache folder's hash."""

    prompts_per_subset: int = doc(32, "prompts in each of comprehensive, counting, composition")
    images_per_prompt: int = doc(8, "images per prompt (P@k with k above this uses all of them)")
    num_steps: int = doc(20, "DDIM steps (the shipped model's usual setting)")
    guidance_scales: tuple[float, ...] = doc(
        (1.0, 2.0, 3.0, 5.0),
        "guidance scales cycled over a prompt's images: low ones fail more, so labels mix",
    )
    eta: float = doc(1.0, "DDIM eta; 1 gives varied images from one prompt")
    annotators: int = doc(3, "labels per image (TIA2 has three)")
    noise: float = doc(0.1, "probability that an annotator replaces the clean label by another one")
    seed: int = doc(0, "seeds the prompt draw, the sampling noise and the annotator noise")

    def __post_init__(self):
        for name in ("prompts_per_subset", "images_per_prompt", "num_steps", "annotators"):
            if getattr(self, name) < 1:
                raise ShapesTiaError(f"shapes-TIA {name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.noise <= 1.0:
            raise ShapesTiaError(f"shapes-TIA noise is a probability in [0, 1], got {self.noise}")
        if not self.guidance_scales:
            raise ShapesTiaError(
                "shapes-TIA guidance_scales needs at least one scale, e.g. (1.0, 2.0, 3.0, 5.0)"
            )


def clean_label(detector_score: float) -> int:
    """1 when every fact holds, -1 when at most half do, 0 in between (see the module doc)."""
    if detector_score >= 1.0:
        return 1
    return -1 if detector_score <= 0.5 else 0


def annotate(clean: int, annotators: int, noise: float, rng: np.random.Generator) -> list[int]:
    """``annotators`` labels: each is ``clean``, or with probability ``noise`` one of the other two."""
    labels = []
    for _ in range(annotators):
        if rng.random() < noise:
            others = [label for label in LABELS if label != clean]
            labels.append(others[rng.integers(len(others))])
        else:
            labels.append(clean)
    return labels


def draw_prompts(config: ShapesTiaConfig) -> dict[str, list[str]]:
    """Each subset's prompts: pools of (split, kind) shuffled with the seed and taken in turn,
    so every pool is represented and none repeats a prompt."""
    rng = np.random.default_rng([config.seed, 0])
    pools = {
        "comprehensive": [(split, kind) for kind in KINDS for split in SPLITS],
        "counting": [(split, "count") for split in SPLITS],
        "composition": [(split, "relation") for split in SPLITS],
    }
    drawn = {}
    for subset, cells in pools.items():
        queues = [list(rng.permutation(split_prompts(split, kind))) for split, kind in cells]
        available = sum(len(queue) for queue in queues)
        if config.prompts_per_subset > available:
            raise ShapesTiaError(
                f"shapes-TIA subset {subset!r} has {available} distinct prompts; "
                f"prompts_per_subset={config.prompts_per_subset} is too many"
            )
        chosen: list[str] = []
        while len(chosen) < config.prompts_per_subset:
            for queue in queues:
                if queue and len(chosen) < config.prompts_per_subset:
                    chosen.append(str(queue.pop(0)))
        drawn[subset] = chosen
    return drawn


def cache_root() -> Path:
    """Where generated data lives: ``$DIFFALIGN_CACHE``, else ``$XDG_CACHE_HOME/diffalign``,
    else ``~/.cache/diffalign``."""
    if os.environ.get("DIFFALIGN_CACHE"):
        return Path(os.environ["DIFFALIGN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffalign"


def default_folder(config: ShapesTiaConfig = ShapesTiaConfig(), root: Path | None = None) -> Path:
    """The cache folder of ``config``: named by the recipe version and a hash of the settings
    and of the shipped model's weights, so retrained weights give a new set."""
    from diffalign.shapes import assets

    digest = hashlib.sha256(json.dumps({"version": VERSION, **asdict(config)}, sort_keys=True).encode())
    for path in sorted(assets.PIPELINE_DIR.rglob("*.safetensors")):
        digest.update(path.read_bytes())
    return (root or cache_root()) / "shapes-tia" / f"v{VERSION}-{digest.hexdigest()[:12]}"


def ensure(
    config: ShapesTiaConfig = ShapesTiaConfig(), *, root: Path | None = None, progress: bool = True
) -> Path:
    """The folder of shapes-TIA for ``config``, generated on first use (768 images; 87 s on
    two CPU cores, 132 s on one)."""
    folder = default_folder(config, root)
    if not folder.is_dir():
        try:
            _build(folder, config, progress)
        except FileExistsError:
            pass  # another process finished the same set first; theirs is identical
    return folder


def make(folder: str | Path, config: ShapesTiaConfig = ShapesTiaConfig(), *, progress: bool = True) -> Path:
    """Write shapes-TIA for ``config`` into ``folder`` (new, or empty) to inspect or share it."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ShapesTiaError(
            f"{folder} already exists and is not an empty folder; choose a new folder for shapes-TIA"
        )
    _build(folder, config, progress)
    return folder


def _build(folder: Path, config: ShapesTiaConfig, progress: bool) -> None:
    """Generate into a temporary sibling folder, then rename it to ``folder`` in one step (a set
    another process finished first is kept: ``FileExistsError``)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with outputs.staging_folder(folder, replace=False) as staging:
        _generate(staging, config, progress)


def _generate(folder: Path, config: ShapesTiaConfig, progress: bool) -> None:
    from diffalign import pipeline, plots
    from diffalign.sampling import sample
    from diffalign.shapes import score

    started = time.perf_counter()
    # One row per image, in a fixed order: (subset, image key, prompt, guidance scale).
    plan = [
        (subset, f"{p:03d}-{i:02d}.png", prompt, config.guidance_scales[i % len(config.guidance_scales)])
        for subset, prompts in draw_prompts(config).items()
        for p, prompt in enumerate(prompts)
        for i in range(config.images_per_prompt)
    ]
    pipe = pipeline.load("shapes")
    generator = torch.Generator().manual_seed(config.seed)
    annotator_rng = np.random.default_rng([config.seed, 1])
    entries: dict[str, dict[str, dict]] = {subset: {} for subset in SUBSETS}
    for subset in SUBSETS:
        (folder / subset).mkdir()
    with tqdm(total=len(plan), desc="shapes-TIA: generating", unit="image", disable=not progress) as bar:
        for start in range(0, len(plan), _BATCH):
            rows = plan[start : start + _BATCH]
            scales = torch.tensor([row[3] for row in rows])[:, None].expand(-1, config.num_steps)  # [B, T]
            trajectory = sample(
                pipe,
                [row[2] for row in rows],
                num_steps=config.num_steps,
                guidance_scale=scales,
                eta=config.eta,
                generator=generator,
            )
            for (subset, key, prompt, guidance), image in zip(rows, trajectory.images):
                picture = plots.to_pil(image)
                picture.save(folder / subset / key)
                # Labels come from the saved 8-bit pixels, exactly what a reward will be shown.
                detector_score = score(np.asarray(picture), prompt)
                labels = annotate(clean_label(detector_score), config.annotators, config.noise, annotator_rng)
                entries[subset][key] = {
                    "image": key,
                    "caption": prompt,
                    "human_labels": labels,
                    "detector_score": detector_score,
                    "guidance_scale": guidance,
                }
            bar.update(len(rows))
    for subset, subset_entries in entries.items():
        (folder / f"{subset}.json").write_text(json.dumps(subset_entries, indent=2), "utf-8")
    _write_readme(folder, config, entries, time.perf_counter() - started)


def _write_readme(
    folder: Path, config: ShapesTiaConfig, entries: dict[str, dict[str, dict]], seconds: float
) -> None:
    counts = {
        subset: {str(label): sum(e["human_labels"].count(label) for e in items.values()) for label in LABELS}
        for subset, items in entries.items()
    }
    settings = {"version": VERSION, **asdict(config)}
    (folder / "README.md").write_text(
        "# shapes-TIA\n\n"
        "A TIA2-format benchmark generated by diffalign (`diffalign.benchmarks.shapes_tia`):\n"
        "`<subset>.json` maps each image in `<subset>/` to its `caption` and\n"
        f"{config.annotators} `human_labels` (1 aligned, 0 unsure, -1 misaligned), derived from the\n"
        "exact ShapesWorld detector (`detector_score`) with simulated annotator noise.\n"
        "Evaluate a reward with `diffalign bench tia2 --data <this folder> --rewards shapes-clip`.\n\n"
        f"Generated in {seconds:.0f} s with {torch.get_num_threads()} torch threads.\n\n"
        f"Labels per subset (all annotators): `{json.dumps(counts)}`\n\n"
        f"Settings:\n\n```json\n{json.dumps(settings, indent=2)}\n```\n",
        "utf-8",
    )
