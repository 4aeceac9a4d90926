"""The trained ShapesWorld models shipped inside the package, and their loaders.

``weights/pipeline`` is an ordinary diffusers ``StableDiffusionPipeline`` folder and
``weights/clip`` an ordinary ``transformers.CLIPModel`` folder, both fp16 safetensors, so
they load with plain ``from_pretrained`` too. ``weights/inpaint/unet`` holds only the
9-channel inpainting UNet (``diffalign.shapes.inpaint_training``); its pipeline borrows the
VAE, text encoder and tokenizer of ``weights/pipeline``, so inpainting adds one UNet to the
package, not a second copy of everything. A missing or damaged file is an error that names
it and the command that rebuilds it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from diffalign.errors import DiffalignError
from diffalign.pipeline import dtype_argument

WEIGHTS = Path(__file__).resolve().parent / "weights"
PIPELINE_DIR = WEIGHTS / "pipeline"
CLIP_DIR = WEIGHTS / "clip"
INPAINT_UNET_DIR = WEIGHTS / "inpaint" / "unet"
NEGCLIP_DIR = WEIGHTS / "negclip"
MARKED_VAE_DIR = WEIGHTS / "vae-marked"
FLOW_DIR = WEIGHTS / "flow"
REBUILD = (
    "diffalign shapes train --output <folder>  (then copy <folder>/pipeline and <folder>/clip into {weights})"
)
REBUILD_INPAINT = "diffalign shapes train-inpaint --output <folder> --install"
REBUILD_NEGCLIP = "diffalign shapes train-negclip --output <folder> --install"
REBUILD_MARKED_VAE = "diffalign shapes train-vae-marked --output <folder> --install"
REBUILD_FLOW = "diffalign shapes train-flow --output <folder> --install"

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
_FLOW_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer_2/tokenizer_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
)
_CLIP_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")
_CLIP_WEIGHT_FILES = ("config.json", "model.safetensors")
_UNET_FILES = ("config.json", "diffusion_pytorch_model.safetensors")  # any diffusers model folder


class ShapesWeightsError(DiffalignError, RuntimeError):
    """A shipped ShapesWorld weight file is missing or unreadable."""


def _check(folder: Path, names: tuple[str, ...], rebuild: str = REBUILD) -> None:
    for name in names:
        path = folder / name
        problem = None
        if not path.is_file():
            problem = "is missing"
        elif path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 - safetensors' handle is not iterable
                        handle.get_slice(key)
            except Exception as error:  # noqa: BLE001 - any failure to read means a damaged file
                problem = f"is damaged ({error})"
        if problem:
            raise ShapesWeightsError(
                f"ShapesWorld weight file {path} {problem}. Reinstall diffalign, or rebuild the models with\n"
                f"    {rebuild.format(weights=WEIGHTS)}"
            )


def load_pipeline(folder: Path = PIPELINE_DIR, torch_dtype: torch.dtype = torch.float32):
    """The ShapesWorld Stable Diffusion pipeline (32×32 images, DDIM scheduler)."""
    from diffusers import StableDiffusionPipeline

    _check(folder, _PIPELINE_FILES)
    return StableDiffusionPipeline.from_pretrained(
        str(folder), **dtype_argument(torch_dtype), safety_checker=None, requires_safety_checker=False
    )


def load_flow_pipeline(folder: Path | None = None, torch_dtype: torch.dtype = torch.float32):
    """``shapes-flow``: the ShapesWorld ``StableDiffusion3Pipeline`` (``diffalign.shapes.flow_model``),
    read from ``folder`` (default ``FLOW_DIR``), with the T5 slot length it was trained with."""
    from diffusers import StableDiffusion3Pipeline

    from diffalign.flow import SEQUENCE_LENGTH_ATTRIBUTE
    from diffalign.shapes.flow_model import MAX_SEQUENCE_LENGTH

    folder = FLOW_DIR if folder is None else folder
    _check(folder, _FLOW_FILES, REBUILD_FLOW)
    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(folder), **dtype_argument(torch_dtype), text_encoder_3=None, tokenizer_3=None
    )
    setattr(pipe, SEQUENCE_LENGTH_ATTRIBUTE, MAX_SEQUENCE_LENGTH)
    return pipe


def load_clip(folder: Path = CLIP_DIR):
    """The ShapesWorld CLIP model (fp32, eval mode) and its tokenizer; ``NEGCLIP_DIR`` for the
    hard-negative fine-tune (``diffalign.shapes.negclip``). A folder without tokenizer files
    (the shipped fine-tune) uses the shipped CLIP's tokenizer, which it was trained with."""
    from transformers import CLIPModel, CLIPTokenizer

    rebuild = REBUILD_NEGCLIP if folder == NEGCLIP_DIR else REBUILD
    tokenizer_folder = folder if (folder / "tokenizer_config.json").is_file() else CLIP_DIR
    _check(folder, _CLIP_WEIGHT_FILES, rebuild)
    _check(tokenizer_folder, _CLIP_FILES, rebuild)
    model = CLIPModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    return model, CLIPTokenizer.from_pretrained(str(tokenizer_folder))


def load_marked_vae(folder: Path | None = None, torch_dtype: torch.dtype = torch.float32):
    """``shapes-vae-marked``: the shipped VAE fine-tuned to draw marked shapes in the same latent
    space (``diffalign.shapes.marked_vae``), read from ``folder`` (default ``MARKED_VAE_DIR``)."""
    from diffusers import AutoencoderKL

    folder = MARKED_VAE_DIR if folder is None else folder
    _check(folder, _UNET_FILES, REBUILD_MARKED_VAE)
    return AutoencoderKL.from_pretrained(str(folder), **dtype_argument(torch_dtype)).eval()


def load_inpainting_pipeline(
    unet_folder: Path | None = None, base: Path = PIPELINE_DIR, torch_dtype: torch.dtype = torch.float32
):
    """The ShapesWorld inpainting pipeline: the 9-channel UNet in ``unet_folder`` (default
    ``INPAINT_UNET_DIR``, read at call time) with the VAE, text encoder, tokenizer and DDIM
    scheduler of the text-to-image pipeline in ``base``."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    unet_folder = INPAINT_UNET_DIR if unet_folder is None else unet_folder
    _check(unet_folder, _UNET_FILES, REBUILD_INPAINT)
    _check(base, _PIPELINE_FILES)
    unet = UNet2DConditionModel.from_pretrained(str(unet_folder), **dtype_argument(torch_dtype))
    return StableDiffusionInpaintPipeline.from_pretrained(
        str(base),
        unet=unet,
        **dtype_argument(torch_dtype),
        safety_checker=None,
        requires_safety_checker=False,
    )


def write_fine_tune_report(
    output: Path, config: dict, before: dict, after: dict, seconds: float, losses: list[float]
) -> dict:
    """Write ``output/training_report.json`` of a fine-tuning recipe (``shapes train-negclip``,
    ``train-vae-marked``): its config, the figures before and after, seconds, threads and about a
    hundred of its losses; returns the report."""
    report = {
        "config": config,
        "before": before,
        "after": after,
        "train_seconds": seconds,
        "torch_threads": torch.get_num_threads(),
        "losses": losses[:: max(1, len(losses) // 100)],
    }
    (output / "training_report.json").write_text(json.dumps(report, indent=2), "utf-8")
    return report


def install_weights(source: Path, destination: Path, names: tuple[str, ...]) -> None:
    """Copy a recipe's output files ``names`` from ``source`` into the package's ``destination``."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(source / name, destination / name)
