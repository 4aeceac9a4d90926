"""Loading Stable Diffusion pipelines and attaching, saving and loading LoRA adapters.

Every model in diffalign is a plain diffusers ``StableDiffusionPipeline`` with a
``DDIMScheduler`` (DDPO/DPOK need the DDIM step's Gaussian transition density), so anything
trained here loads in any diffusers program, and anything diffusers loads trains here.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModel

from diffalign import registry
from diffalign.errors import DiffalignError
from diffalign.tokenizer import clip_tokenizer


class PipelineError(DiffalignError, ValueError):
    """A pipeline could not be loaded or is unsuitable for diffalign."""


def register(
    name: str, load: Callable[..., DiffusionPipeline], *, kind: str = "text-to-image", description: str = ""
):
    """Make ``name`` a built-in model: ``load(torch_dtype=..., seed=...)`` builds the pipeline.
    ``kind`` is ``text-to-image`` or ``inpainting`` (``diffalign.inpainting.load_inpainting``)."""
    return registry.register_pipeline(name, load, kind=kind, description=description)


def builtin_names(kind: str | None = None) -> list[str]:
    """The registered model names (of one ``kind``, or all)."""
    return [entry.name for entry in registry.PIPELINES if kind is None or entry.kind == kind]


def load(spec: str, *, torch_dtype: torch.dtype = torch.float32, seed: int = 0) -> DiffusionPipeline:
    """Return a pipeline ready for diffalign's samplers: a ``StableDiffusionPipeline`` with a
    ``DDIMScheduler``, or a ``StableDiffusion3Pipeline`` (rectified flow, ``diffalign.flow``).

    ``spec`` is a built-in name (``tiny-random``: random weights from small configs, for tests
    and smoke runs, ``seed`` picks the weights; ``shapes``: the shipped ShapesWorld model, and
    whatever else a provider registered, see ``builtin_names()``; an inpainting name returns
    that ``StableDiffusionInpaintPipeline``), a local pipeline folder, or a Hugging Face hub id
    already in the local cache (set ``HF_HUB_OFFLINE=1`` to forbid network look-ups).
    """
    from diffalign import families

    pipe = resolve(spec, pipeline_class_of(spec), torch_dtype=torch_dtype, seed=seed)
    try:
        families.of(pipe).prepare_scheduler(pipe)
    except families.FamilyError as error:
        raise PipelineError(f"{spec!r}: {error}") from error
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_index(spec: str) -> dict:
    """The ``model_index.json`` of a pipeline folder or of a hub id in the local cache ({} when
    there is none or it cannot be read): the one place both are looked up."""
    import json

    index = Path(spec).expanduser() / "model_index.json"
    if not index.is_file() and "/" in spec and not looks_like_path(spec):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "model_index.json")
        index = Path(cached) if isinstance(cached, str) else index
    try:
        entries = json.loads(index.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def pipeline_class_of(spec: str) -> type:
    """The diffusers pipeline class a folder or cached hub id declares in its ``model_index.json``
    (``StableDiffusionPipeline`` when it declares none diffalign can load, or cannot be read)."""
    import diffusers

    cls = getattr(diffusers, str(model_index(spec).get("_class_name", "")), None)
    text_to_image = (
        isinstance(cls, type) and issubclass(cls, DiffusionPipeline) and "Inpaint" not in cls.__name__
    )
    return cls if text_to_image else StableDiffusionPipeline


def dtype_argument(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` keyword for ``dtype``: diffusers renamed ``torch_dtype`` to ``dtype``
    (following transformers) and warns on every load that uses the old name."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def looks_like_path(spec: str) -> bool:
    """True for what can only be a local path; ``org/name`` is read as a hub id."""
    return spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1


def check_spec(spec: str, kind: str | None = None) -> None:
    """Refuse, before anything loads, a model name that is neither built in (of ``kind``), nor a
    folder, nor a hub id (``org/name``): most often a typo of a built-in name, which the error suggests."""
    builtin = builtin_names(kind)
    if spec in builtin or "/" in spec or Path(spec).expanduser().exists():
        return
    close = difflib.get_close_matches(spec, builtin, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise PipelineError(
        f"no model {spec!r}: not a built-in name, not a folder, and not a hub id (org/name).{hint} "
        f"Built-in: {', '.join(builtin)}; or a diffusers pipeline folder (with model_index.json)."
    )


def resolve(spec: str, cls: type, *, torch_dtype: torch.dtype, seed: int = 0, kind: str | None = None):
    """The one loader path of every pipeline class diffalign loads (text-to-image, inpainting):
    a registered name (of ``kind``, or any) is built by its loader; anything else is a local
    folder or a cached hub id for ``cls.from_pretrained``, with errors that teach."""
    entry = registry.PIPELINES.get(spec)
    if entry is not None and (kind is None or entry.kind == kind):
        return entry.load(torch_dtype=torch_dtype, seed=seed)
    return from_pretrained(cls, spec, torch_dtype, kind=kind)


def from_pretrained(cls: type, spec: str, dtype: torch.dtype, *, kind: str | None = None):
    """``cls.from_pretrained(spec)`` for a local folder or a cached hub id, with errors that teach.

    A name that is neither a folder nor a hub id (``org/name``) but close to a built-in name (of
    ``kind``) is a typo of it ("did you mean 'shapes'?"), not a hub look-up ending in offline noise.
    """
    check_spec(spec, kind)
    builtin = builtin_names(kind)
    folder = Path(spec).expanduser()
    if looks_like_path(spec) and not folder.exists():
        raise PipelineError(
            f"model folder {spec!r} does not exist. Pass a diffusers pipeline folder (with model_index.json), "
            f"a hub id already in the Hugging Face cache, or a built-in name: {', '.join(builtin)}."
        )
    if folder.is_dir() and not (folder / "model_index.json").exists():
        raise PipelineError(
            f"{spec!r} is a folder but not a diffusers pipeline: it has no model_index.json. "
            "Save one with `pipe.save_pretrained(folder)` or point at the folder that contains model_index.json."
        )
    import inspect

    # SD 1.x/2.x pipelines carry a safety checker diffalign never runs; other classes have none.
    has_checker = "safety_checker" in inspect.signature(cls.__init__).parameters
    extra = {"safety_checker": None, "requires_safety_checker": False} if has_checker else {}
    # Components saved as absent ([null, null], e.g. SD3 without its T5 encoder) are passed as None,
    # as diffusers asks (``from_pretrained(..., text_encoder_3=None, tokenizer_3=None)``).
    extra.update(dict.fromkeys(absent_components(spec)))
    try:
        return cls.from_pretrained(spec, **dtype_argument(dtype), **extra)
    except (OSError, ValueError) as error:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        label = "inpainting" if kind == "inpainting" else "Stable Diffusion"
        raise PipelineError(
            f"could not load {label} pipeline {spec!r}{offline}: {error}\n"
            "diffalign never downloads weights at run time. On a machine with internet run\n"
            f"    huggingface-cli download {spec} --local-dir <folder>\n"
            "then pass that folder (or copy the Hugging Face cache and set HF_HUB_OFFLINE=1)."
        ) from error


def absent_components(spec: str) -> list[str]:
    """The components a pipeline's ``model_index.json`` records as absent (``[null, null]``)."""
    entries = model_index(spec)
    return [key for key, value in entries.items() if value == [None, None] and not key.startswith("_")]


def swap_vae(pipe: StableDiffusionPipeline, spec: str, model: str) -> AutoencoderKL:
    """Put the autoencoder ``spec`` into ``pipe`` (built from ``model``) in place of its own, and return it.

    ``spec`` is a registered VAE (``registry.register_vae``, e.g. ShapesWorld's ``shapes-vae-marked``),
    a local folder holding an ``AutoencoderKL`` (its ``config.json``, or a pipeline folder's ``vae/``),
    or a cached hub id, as Stable Diffusion users swap in ``stabilityai/sd-vae-ft-mse``. The UNet was
    trained on the old VAE's latents, so the new one must share their shape and scale: a different
    ``latent_channels``, down-sampling or ``scaling_factor`` is refused, not silently decoded wrong.
    """
    entry = registry.VAES.get(spec)
    dtype = pipe.vae.dtype
    if entry is not None:
        if model not in entry.models:
            raise PipelineError(
                f"vae {spec!r} is made for the models {', '.join(entry.models)}, not {model!r}: its latents "
                "are theirs. Leave vae empty to keep the pipeline's own."
            )
        vae = entry.load(torch_dtype=dtype)
    else:
        folder = Path(spec).expanduser()
        if not folder.exists() and ("/" not in spec or looks_like_path(spec)):
            close = difflib.get_close_matches(spec, registry.VAES.names(), n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise PipelineError(
                f"no VAE {spec!r}: not a registered VAE, not a folder, not a hub id (org/name).{hint} "
                f"Registered: {', '.join(registry.VAES.names()) or 'none'}."
            )
        subfolder = "vae" if (folder / "vae" / "config.json").is_file() else None
        try:
            vae = AutoencoderKL.from_pretrained(spec, subfolder=subfolder, **dtype_argument(dtype))
        except (OSError, ValueError) as error:
            raise PipelineError(
                f"could not load the VAE {spec!r}: {error}\ndiffalign never downloads weights at run time: "
                "pass a folder with the AutoencoderKL's config.json and weights (or a pipeline folder with vae/)."
            ) from error
    old, new = pipe.vae.config, vae.config
    for key in ("latent_channels", "scaling_factor"):
        if getattr(old, key) != getattr(new, key):
            raise PipelineError(
                f"vae {spec!r} does not fit {model!r}: its {key} is {getattr(new, key)}, the pipeline's is "
                f"{getattr(old, key)}, so the denoiser's latents would be read wrong"
            )
    old_shift, new_shift = old.get("shift_factor", None) or 0.0, new.get("shift_factor", None) or 0.0
    if old_shift != new_shift:  # SD3's VAE centres its latents, SD 1.x/2.x's does not
        raise PipelineError(
            f"vae {spec!r} does not fit {model!r}: its shift_factor is {new_shift}, the pipeline's is {old_shift}, "
            "so the denoiser's latents would be read off-centre"
        )
    if len(old.block_out_channels) != len(new.block_out_channels):
        raise PipelineError(
            f"vae {spec!r} does not fit {model!r}: it down-samples {2 ** (len(new.block_out_channels) - 1)}×, "
            f"the pipeline's VAE {2 ** (len(old.block_out_channels) - 1)}×"
        )
    vae.requires_grad_(False)
    pipe.vae = vae.to(pipe.vae.device).eval()
    pipe.register_modules(vae=pipe.vae)
    return pipe.vae


def ddim_scheduler_for(pipe: StableDiffusionPipeline) -> DDIMScheduler:
    """Turn the pipeline's scheduler into DDIM with the same noise schedule, or refuse."""
    scheduler = pipe.scheduler
    if isinstance(scheduler, DDIMScheduler):
        return scheduler
    compatible = {cls.__name__ for cls in getattr(scheduler, "compatibles", [])}
    if "DDIMScheduler" not in compatible:
        raise PipelineError(
            f"the pipeline's scheduler {type(scheduler).__name__} has no DDIM-compatible noise schedule; "
            "diffalign's samplers need DDIM's Gaussian steps. Use a pipeline trained with a DDPM-style "
            "(beta) schedule, e.g. Stable Diffusion 1.x/2.x."
        )
    return DDIMScheduler.from_config(scheduler.config)


def tiny_random_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A few-MB Stable Diffusion pipeline with random weights: 32×32 images, 4×16×16 latents.

    Same classes as SD 1.x, scaled down so that tests and smoke runs take seconds on a CPU.
    The tokenizer is the real CLIP tokenizer; the scheduler uses SD 1.x's noise schedule.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        # Attention only at the 8×8 level: at 16×16 it costs 5× more on a CPU and adds nothing here.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=32,
        )
    )
    return assemble(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet)


def sd_ddim_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion 1.x's noise schedule, so hyperparameters carry over to small models."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def assemble(
    *, vae: AutoencoderKL, text_encoder, tokenizer, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` from components, with a DDIM scheduler and no safety checker."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def add_lora(
    pipe: DiffusionPipeline,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: tuple[str, ...] = (),
    init: str = "default",
) -> None:
    """Attach a trainable LoRA adapter (peft) to the denoiser (UNet or transformer), freeze the rest.

    ``target_modules`` empty: the family's default (``DEFAULT_LORA_TARGETS`` on a UNet; the image
    and text streams' attention projections on an SD3 transformer, as Flow-GRPO).
    Both inits set the up-projection B to zero, so right after this call the pipeline computes
    exactly what the base model does (DDPO's first ratio is 1, DPOK's KL is 0). They differ in
    the down-projection A: ``default`` is peft's Kaiming-uniform, ``gaussian`` is N(0, 1/rank²)
    as ddpo-pytorch and trl initialise it. Early in training an Adam update moves B by about the
    learning rate per entry whatever A is, so the weight change ΔW = (alpha/rank)·B·A scales
    with |A|: a larger A is the same as a larger ``alpha`` (or learning rate, to first order).
    """
    from diffalign import families

    family = families.of(pipe)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    init_lora_weights = {"default": True, "gaussian": "gaussian"}[init]
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        target_modules=list(target_modules or family.lora_targets),
        init_lora_weights=init_lora_weights,
    )
    getattr(pipe, family.denoiser_name).add_adapter(config)


def lora_state_dict(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of ``denoiser`` (UNet or transformer) in peft's key format (``lora_A``/``lora_B``).

    diffusers loads this format for every module type. The older diffusers format
    (``convert_state_dict_to_diffusers``) renames only attention projections, so an adapter that
    also targets convolutions or feed-forward layers came out with mixed keys, and
    ``load_lora_weights`` then took the file for peft format and dropped every attention weight.
    """
    return get_peft_model_state_dict(denoiser)


def lora_metadata(denoiser: torch.nn.Module) -> dict:
    """The adapter's LoraConfig as diffusers stores it in the safetensors header.

    Without it a loader infers the rank from the weights and takes ``alpha = rank``, which is
    wrong for any adapter trained with another alpha.
    """
    config = denoiser.peft_config["default"].to_dict()
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


def save_lora(denoiser: torch.nn.Module, folder: str | Path) -> None:
    """Write the denoiser's adapter in diffusers' LoRA format, so that ``pipe.load_lora_weights(folder)``
    works in any diffusers program (``StableDiffusionPipeline`` or ``StableDiffusion3Pipeline``)."""
    from diffalign import families

    family = families.of_denoiser(denoiser)
    family.pipeline_class.save_lora_weights(
        save_directory=str(folder),
        **{
            f"{family.denoiser_name}_lora_layers": lora_state_dict(denoiser),
            f"{family.denoiser_name}_lora_adapter_metadata": lora_metadata(denoiser),
        },
        safe_serialization=True,
    )


def load_lora_into_adapter(denoiser: torch.nn.Module, folder: str | Path) -> None:
    """Overwrite the denoiser's existing trainable adapter with the weights saved in ``folder`` (resume).

    Reads both key formats: peft's, which :func:`save_lora` writes, and diffusers' older one,
    which checkpoints written before it used.
    """
    from diffalign import families

    family = families.of_denoiser(denoiser)
    loaded = family.pipeline_class.lora_state_dict(str(folder))
    state = loaded[0] if isinstance(loaded, tuple) else loaded
    prefix = f"{family.denoiser_name}."
    own = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
    # The conversion renames old-format keys and leaves peft-format ones as they are.
    result = set_peft_model_state_dict(denoiser, convert_unet_state_dict_to_peft(own), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise PipelineError(
            f"LoRA in {folder} does not fit this {family.denoiser_name}: unexpected keys {unexpected[:5]}"
        )
    missing = [key for key in getattr(result, "missing_keys", []) if "lora_" in key]
    if missing:
        raise PipelineError(
            f"LoRA in {folder} lacks weights this {family.denoiser_name}'s adapter has: {missing[:5]}"
        )


def enable_memory_savers(
    pipe: StableDiffusionPipeline,
    *,
    xformers: bool = False,
    attention_slicing: bool = False,
    gradient_checkpointing: bool = False,
) -> None:
    """Optional speed/memory switches; each one is a no-op (with a warning) where unsupported."""
    if xformers:
        try:
            pipe.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError, NotImplementedError) as error:
            warnings.warn(f"xformers requested but unavailable here ({error}); using default attention.")
    if attention_slicing:
        pipe.enable_attention_slicing()
    if gradient_checkpointing:
        from diffalign import families

        families.denoiser(pipe).enable_gradient_checkpointing()


def _tiny_random(*, torch_dtype: torch.dtype, seed: int) -> StableDiffusionPipeline:
    return tiny_random_pipeline(seed=seed)  # built in fp32 whatever the dtype, as it always was


def _tiny_random_inpaint(*, torch_dtype: torch.dtype, seed: int) -> StableDiffusionInpaintPipeline:
    from diffalign.inpainting import tiny_random_inpaint_pipeline

    return tiny_random_inpaint_pipeline(seed=seed)


register("tiny-random", _tiny_random, description="random weights from small configs (tests, smoke runs)")
register(
    "tiny-random-inpaint",
    _tiny_random_inpaint,
    kind="inpainting",
    description="random weights, 9-channel inpainting UNet (tests)",
)


def _tiny_random_flow(*, torch_dtype: torch.dtype, seed: int) -> DiffusionPipeline:
    from diffalign.flow import tiny_random_flow_pipeline

    return tiny_random_flow_pipeline(seed=seed)


register(
    "tiny-random-flow",
    _tiny_random_flow,
    description="random weights, Stable Diffusion 3 classes (MM-DiT transformer, rectified flow; tests)",
)
