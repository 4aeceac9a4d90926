"""The trained ShapesWorld models shipped inside the package, and their loaders.

``weights/pipeline`` is an ordinary diffusers ``StableDiffusionPipeline`` folder and
``weights/clip`` an ordinary ``transformers.CLIPModel`` folder, both fp16 safetensors, so
they load with plain ``from_pretrained`` too. A missing or damaged file is an error that
names it and the command that rebuilds the models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

WEIGHTS = Path(__file__).resolve().parent / "weights"
PIPELINE_DIR = WEIGHTS / "pipeline"
CLIP_DIR = WEIGHTS / "clip"
REBUILD = "diffalign shapes train --output <folder>  (then copy <folder>/pipeline and <folder>/clip into {weights})"

_PIPELINE_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
)
_CLIP_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


class ShapesWeightsError(RuntimeError):
    """A shipped ShapesWorld weight file is missing or unreadable."""


def _check(folder: Path, names: tuple[str, ...]) -> None:
    for name in names:
        path = folder / name
        problem = None
        if not path.is_file():
            problem = "is missing"
        elif path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():
                        handle.get_slice(key)
            except Exception as error:  # noqa: BLE001 - any failure to read means a damaged file
                problem = f"is damaged ({error})"
        if problem:
            raise ShapesWeightsError(
                f"ShapesWorld weight file {path} {problem}. Reinstall diffalign, or rebuild the models with\n"
                f"    {REBUILD.format(weights=WEIGHTS)}"
            )


def load_pipeline(folder: Path = PIPELINE_DIR, torch_dtype: torch.dtype = torch.float32):
    """The ShapesWorld Stable Diffusion pipeline (32×32 images, DDIM scheduler)."""
    from diffusers import StableDiffusionPipeline

    _check(folder, _PIPELINE_FILES)
    return StableDiffusionPipeline.from_pretrained(
        str(folder), torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False
    )


def load_clip(folder: Path = CLIP_DIR):
    """The ShapesWorld CLIP model (fp32, eval mode) and its tokenizer."""
    from transformers import CLIPModel, CLIPTokenizer

    _check(folder, _CLIP_FILES)
    model = CLIPModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    return model, CLIPTokenizer.from_pretrained(str(folder))
