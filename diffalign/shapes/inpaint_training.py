"""Fine-tuning the ShapesWorld UNet into an inpainting UNet, and measuring the editor it makes.

The recipe is Stable Diffusion inpainting's (Rombach et al. 2022, and the
``stable-diffusion-inpainting`` model card), scaled down:

1. The text-to-image UNet gets five more input channels, the repaint mask (1) and the VAE
   latents of the masked image (4), whose first-convolution weights start at zero. At
   initialisation the UNet therefore computes exactly what the text-to-image model does,
   and fine-tuning only has to learn to read the new inputs.
2. It is fine-tuned with ε-prediction on scaled VAE latents of rendered train-split scenes,
   the VAE and the CLIP text encoder frozen, 10 % of captions dropped (classifier-free
   guidance, as in the base recipe), EMA weights kept.
3. Masks are random and of several kinds (``MASK_MIX``): SD-inpainting drew synthetic masks
   and masked the whole image 25 % of the time, which keeps plain text-to-image generation
   alive; ShapesWorld adds the edit that ``diffalign.defenses`` guard against, keep one
   object and repaint everything else.

Only the 9-channel UNet is kept (``weights/inpaint/unet`` once installed); the pipeline is
assembled at load time around the shipped VAE, text encoder and tokenizer
(``assets.load_inpainting_pipeline``), and ``export_pipeline`` writes a standalone diffusers
folder. ``evaluate_inpainting`` measures an editor with the exact oracle.

Masks here follow diffusers (1 = repainted); ``diffalign.inpainting`` explains both conventions.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from scipy import ndimage
from tqdm.auto import tqdm

from diffalign import outputs
from diffalign.shapes import assets, models
from diffalign.shapes.detector import score
from diffalign.shapes.grammar import parse, scene_for
from diffalign.shapes.splits import prompts as split_prompts
from diffalign.shapes.training import Dataset, encode_dataset, render_dataset, tokenize
from diffalign.shapes.world import Scene, render

# Kinds of repaint mask (1 = repainted) and their shares of training examples.
MASK_MIX: dict[str, float] = {
    "everything": 0.25,  # SD-inpainting's 25 % fully masked: plain text-to-image, guided by the prompt alone
    "keep-object": 0.30,  # repaint all but one object's pixels: the edit the defenses are built against
    "boxes": 0.20,  # 1-3 rectangles, repainted or (half the time) kept: the usual hand-drawn masks
    "blob": 0.20,  # one smooth random region covering 20-80 %: irregular, brush-like masks
    "nothing": 0.05,  # nothing repainted: teaches that a visible region is to be reproduced as it is
}

CHECKPOINT = "checkpoint.pt"
STAGE = "stage.json"


@dataclass
class InpaintTrainingConfig:
    """Hyperparameters of the inpainting recipe (defaults: the shipped model, ~22 min on 2 CPU threads)."""

    seed: int = 0
    dataset_size: int = 20_000  # rendered train-split scenes (seed 0: the base recipe's own scenes)
    # ~0.6 s a step on 2 threads (1.0 s measured on 1): ~20 min of the ~22 the recipe takes.
    steps: int = 2_000
    batch_size: int = 64  # as the base UNet stage
    # Below the base stage's 5e-4 (a fine-tune, not a start from scratch): the zero-initialised
    # channels must be learnt without washing out the text-to-image skill the UNet starts with.
    learning_rate: float = 2e-4
    # conv_in, the one layer with new (zero) weights, learns this many times faster: SD-inpainting
    # had hundreds of thousands of steps to learn to read the new channels, this recipe has 2000.
    # In 300-step pilots (batch 32) it ended ~7 % lower on every mask kind than 5e-4 everywhere.
    input_layer_lr_scale: float = 10.0
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    # diffusers' EMA ramps its decay up as (1 + n) / (10 + n), so over a short fine-tune the
    # average covers the last few hundred steps, not the zero-initialised start.
    ema_decay: float = 0.999
    checkpoint_every: int = 200  # steps between resumable checkpoints (~2 min of work lost at most)
    eval_scenes: int = 128  # keep-one-object edits scored after training, for both editors; 0 skips
    eval_steps: int = 20  # DDIM steps of those edits (the world's sampling budget)
    eval_guidance: float = 5.0  # the guidance scale the base model samples best at


# Fields that change how a run is checked or measured, not the weights it trains.
_NOT_TRAINING = ("checkpoint_every", "eval_scenes", "eval_steps", "eval_guidance")


def init_inpainting_unet(base: UNet2DConditionModel) -> UNet2DConditionModel:
    """A copy of ``base`` that takes ``cat([latents, repaint mask, masked-image latents])``.

    The first convolution keeps ``base``'s weights for the latent channels and gets zero
    weights for the five new ones, as SD-inpainting was initialised, so the new UNet's output
    equals ``base``'s whatever the mask and masked image are.
    """
    latent_channels = base.config.in_channels
    unet = UNet2DConditionModel.from_config({**base.config, "in_channels": 2 * latent_channels + 1})
    state = base.state_dict()
    weight = state["conv_in.weight"]  # [out, latent_channels, k, k]
    wide = weight.new_zeros(weight.shape[0], 2 * latent_channels + 1, *weight.shape[2:])
    wide[:, :latent_channels] = weight
    unet.load_state_dict({**state, "conv_in.weight": wide})
    return unet


def object_regions(image: np.ndarray) -> np.ndarray:
    """Labels ``[H, W]`` uint8 of a rendered scene's objects (0 = background, 1..k).

    The background is exactly neutral, so every pixel an object touches, its anti-aliased
    rim included, has some chroma; objects keep a gap of at least one clean pixel, so each is
    one connected region.
    """
    touched = image.max(-1) > image.min(-1)
    labels, _ = ndimage.label(touched)
    return labels.astype(np.uint8)


def random_repaint_mask(kind: str, regions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One repaint mask ``[H, W]`` (float, 1 = repainted) of a ``MASK_MIX`` kind, for an image
    whose objects are labelled in ``regions  # [H, W]``."""
    size = regions.shape[-1]
    if kind == "everything":
        return torch.ones(size, size)
    if kind == "nothing":
        return torch.zeros(size, size)
    if kind == "keep-object":
        chosen = 1 + int(torch.randint(int(regions.max()), (1,), generator=generator))
        return (regions != chosen).float()
    if kind == "boxes":
        mask = torch.zeros(size, size)
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            height, width = (size * (0.2 + 0.5 * torch.rand(2, generator=generator))).long().tolist()
            top = int(torch.randint(size - height + 1, (1,), generator=generator))
            left = int(torch.randint(size - width + 1, (1,), generator=generator))
            mask[top : top + height, left : left + width] = 1
        return 1 - mask if torch.rand(1, generator=generator) < 0.5 else mask
    if kind == "blob":
        coarse = torch.rand(1, 1, 4, 4, generator=generator)
        smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0, 0]
        share = 0.2 + 0.6 * float(torch.rand(1, generator=generator))
        return (smooth > torch.quantile(smooth, 1 - share)).float()
    raise ValueError(f"unknown mask kind {kind!r}; kinds are {', '.join(MASK_MIX)}")


@dataclass
class InpaintingData:
    """What the training loop samples from, computed once from the rendered scenes."""

    images: torch.Tensor  # [N, 3, H, W] in [0, 1]
    regions: torch.Tensor  # [N, H, W] uint8 object labels (``object_regions``)
    latent_means: torch.Tensor  # [N, C, h, w] VAE posterior means (unscaled)
    latent_stds: torch.Tensor  # [N, C, h, w]
    caption_index: torch.Tensor  # [N] rows of ``embeddings``
    embeddings: torch.Tensor  # [U, L, D] frozen text-encoder states of the unique captions
    empty: int  # the row of the empty caption (caption dropout)


@torch.no_grad()
def prepare_data(base: StableDiffusionPipeline, dataset: Dataset) -> InpaintingData:
    """Object regions, VAE posteriors and caption embeddings of every scene, so the loop
    runs only the VAE encoder on masked images and the UNet."""
    pixels = (dataset.images * 255).round().byte().permute(0, 2, 3, 1).numpy()
    regions = torch.from_numpy(np.stack([object_regions(image) for image in pixels]))
    unique = sorted(set(dataset.captions) | {""})
    embeddings = base.text_encoder(tokenize(base.tokenizer, unique))[0]
    position = {caption: i for i, caption in enumerate(unique)}
    means, stds = encode_dataset(base.vae, dataset.images)
    return InpaintingData(
        images=dataset.images,
        regions=regions,
        latent_means=means,
        latent_stds=stds,
        caption_index=torch.tensor([position[c] for c in dataset.captions]),
        embeddings=embeddings,
        empty=position[""],
    )


class Batch(NamedTuple):
    """One training batch, as the 9-channel UNet takes it."""

    model_input: torch.Tensor  # [B, 2C+1, h, w]: cat([noisy latents, repaint mask, masked-image latents])
    timesteps: torch.Tensor  # [B]
    text: torch.Tensor  # [B, L, D]
    noise: torch.Tensor  # [B, C, h, w]: the ε target


@torch.no_grad()
def draw_batch(
    base: StableDiffusionPipeline,
    data: InpaintingData,
    batch_size: int,
    caption_dropout: float,
    generator: torch.Generator,
) -> Batch:
    """Random scenes, masks, captions (some dropped), timesteps and noise.

    The mask and masked-image latents are made as ``StableDiffusionInpaintPipeline`` makes
    them, so that the model is trained on what it is given at edit time: repainted pixels of
    the [-1, 1] image set to 0, a posterior sample of the VAE times its scaling factor, and
    the mask downsampled to latent size by nearest neighbour.
    """
    scale = base.vae.config.scaling_factor
    rows = torch.randint(len(data.images), (batch_size,), generator=generator)
    means, stds = data.latent_means[rows], data.latent_stds[rows]
    latents = (means + stds * torch.randn(means.shape, generator=generator)) * scale
    kinds = list(MASK_MIX)
    shares = torch.tensor(list(MASK_MIX.values()))
    picks = torch.multinomial(shares, batch_size, replacement=True, generator=generator).tolist()
    repaint = torch.stack(
        [random_repaint_mask(kinds[k], data.regions[r], generator) for k, r in zip(picks, rows.tolist())]
    )[:, None]  # [B, 1, H, W]
    masked = (2 * data.images[rows] - 1) * (1 - repaint)
    posterior = base.vae.encode(masked).latent_dist
    sample = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    masked_latents = sample * scale
    small_repaint = F.interpolate(repaint, size=latents.shape[-2:])
    conditions = data.caption_index[rows].clone()
    conditions[torch.rand(batch_size, generator=generator) < caption_dropout] = data.empty
    noise = torch.randn(latents.shape, generator=generator)
    alphas = base.scheduler.alphas_cumprod
    timesteps = torch.randint(len(alphas), (batch_size,), generator=generator)
    alpha = alphas[timesteps].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    model_input = torch.cat([noisy, small_repaint, masked_latents], dim=1)
    return Batch(model_input, timesteps, data.embeddings[conditions], noise)


def inpainting_loss(unet: UNet2DConditionModel, batch: Batch) -> torch.Tensor:
    """ε-prediction MSE over the whole latent (SD-inpainting's loss), in fp32."""
    prediction = unet(batch.model_input, batch.timesteps, encoder_hidden_states=batch.text).sample
    return F.mse_loss(prediction.float(), batch.noise.float())


def _settings(config: InpaintTrainingConfig, base: Path) -> dict:
    """What determines the trained weights: a checkpoint or a finished UNet is reused only if it matches."""
    settings = {k: v for k, v in asdict(config).items() if k not in _NOT_TRAINING}
    return {**settings, "base": str(Path(base).resolve())}


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file beside ``path`` and rename it over: a crash leaves the old
    checkpoint or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with outputs.replacing(path) as temporary:
        torch.save(state, temporary)


def train_inpainting_unet(
    base: StableDiffusionPipeline,
    data: InpaintingData,
    config: InpaintTrainingConfig,
    checkpoint: Path,
    settings: dict,
) -> tuple[UNet2DConditionModel, float]:
    """Fine-tune a 9-channel copy of ``base.unet``; returns the EMA weights and the training seconds.

    Every ``config.checkpoint_every`` steps the whole state (weights, EMA, optimizer, schedule,
    random generator, step) goes to ``checkpoint``; a call with the same ``settings`` resumes
    from it and ends with the weights an uninterrupted run would have.
    """
    unet = init_inpainting_unet(base.unet).train()
    rest = [p for name, p in unet.named_parameters() if not name.startswith("conv_in.")]
    input_layer = list(unet.conv_in.parameters())
    input_lr = config.learning_rate * config.input_layer_lr_scale
    groups = [{"params": rest}, {"params": input_layer, "lr": input_lr}]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay)
    generator = torch.Generator().manual_seed(config.seed + 3)  # +0..2 are the base recipe's stages
    start, seconds = 0, 0.0
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        if state["settings"] == settings:
            unet.load_state_dict(state["unet"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            ema.load_state_dict(state["ema"])
            generator.set_state(state["generator"])
            start, seconds = state["step"], state["seconds"]
        else:
            warnings.warn(f"{checkpoint} was written with other settings; training from the start instead")
    started = time.perf_counter() - seconds
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train inpainting UNet")
    for step in bar:
        batch = draw_batch(base, data, config.batch_size, config.caption_dropout, generator)
        loss = inpainting_loss(unet, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % config.checkpoint_every == 0 and done < config.steps:
            _save_checkpoint(
                checkpoint,
                {
                    "settings": settings,
                    "step": done,
                    "seconds": time.perf_counter() - started,
                    "unet": unet.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "ema": ema.state_dict(),
                    "generator": generator.get_state(),
                },
            )
    ema.copy_to(unet.parameters())
    return unet.eval(), time.perf_counter() - started


def export_pipeline(
    folder: Path, unet_folder: Path | None = None, base: Path = assets.PIPELINE_DIR, fp16: bool = True
) -> StableDiffusionInpaintPipeline:
    """Write a standalone diffusers inpainting folder (UNet from ``unet_folder``, default the
    shipped one; the rest from ``base``) that loads with plain
    ``StableDiffusionInpaintPipeline.from_pretrained(folder)``; returns the pipeline in fp32."""
    pipe = assets.load_inpainting_pipeline(unet_folder, base)
    pipe.to(torch.float16 if fp16 else torch.float32).save_pretrained(str(folder), safe_serialization=True)
    return pipe.to(torch.float32)


def install(unet_folder: Path, destination: Path = assets.INPAINT_UNET_DIR) -> None:
    """Copy a trained UNet (config and weights only) to where ``load("shapes-inpaint")`` reads it."""
    assets.install_weights(unet_folder, destination, ("config.json", "diffusion_pytorch_model.safetensors"))


def blended_inpainting(base: StableDiffusionPipeline) -> StableDiffusionInpaintPipeline:
    """The untrained alternative: diffusers' inpainting pipeline around the 4-channel UNet,
    which re-noises the kept region's latents and pastes them in at every step."""
    pipe = StableDiffusionInpaintPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        scheduler=base.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class EditSet(NamedTuple):
    """Scenes to edit: keep one object, repaint the rest so that the prompt holds."""

    images: torch.Tensor  # [N, 3, H, W] in [0, 1]
    keep_masks: torch.Tensor  # [N, 1, H, W], 1 = kept (the pixels of one object)
    prompts: list[str]  # the whole intended scene: the kept object, another one, their relation


def edit_set(count: int, seed: int = 0, size: int = models.IMAGE_SIZE) -> EditSet:
    """``count`` train-split relation scenes; in each, one of the two objects (at random) is kept."""
    rng = np.random.default_rng(seed)
    pool = split_prompts("train", "relation")
    images, masks, prompts = [], [], []
    for _ in range(count):
        prompt = pool[rng.integers(len(pool))]
        scene = scene_for(parse(prompt), rng)
        kept = render(Scene((scene.objects[rng.integers(2)],)), size)
        images.append(render(scene, size))
        masks.append(object_regions(kept) > 0)
        prompts.append(prompt)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return EditSet(pixels, torch.from_numpy(np.stack(masks))[:, None].float(), prompts)


@dataclass
class InpaintingQuality:
    """How an editor did on an ``EditSet``."""

    scenes: int
    success: float  # share of edits the oracle finds exactly right (score 1)
    score: float  # the oracle's mean score of the edits against their prompts
    kept_error: float  # mean absolute change of the kept pixels, [0, 1] units (0 = untouched)


def inpainting_quality(edited: torch.Tensor, edits: EditSet) -> InpaintingQuality:
    """Score ``edited  # [N, 3, H, W] in [0, 1]`` against the prompts and the kept regions of ``edits``."""
    scores = np.array([score(image, prompt) for image, prompt in zip(edited.float(), edits.prompts)])
    keep = edits.keep_masks
    change = ((edited.float() - edits.images).abs() * keep).sum() / (3 * keep.sum())
    return InpaintingQuality(len(scores), float((scores == 1).mean()), float(scores.mean()), float(change))


@torch.no_grad()
def evaluate_inpainting(
    pipe: StableDiffusionInpaintPipeline,
    scenes: int = 128,
    *,
    steps: int = 20,
    guidance: float = 5.0,
    seed: int = 0,
    batch_size: int = 32,
) -> InpaintingQuality:
    """Keep one object of each of ``scenes`` scenes and ask for the whole scene (``edit_set``).

    The editor runs as ``diffalign.inpainting.edit`` does (diffusers' pipeline unchanged, no
    pasting back), in batches, from seeded noise.
    """
    edits = edit_set(scenes, seed)
    pipe.set_progress_bar_config(disable=True)  # one bar per batch of 20 steps says nothing
    generator = torch.Generator().manual_seed(seed)
    height, width = edits.images.shape[-2:]
    outputs = []
    for start in range(0, scenes, batch_size):
        end = start + batch_size
        result = pipe(
            prompt=edits.prompts[start:end],
            image=edits.images[start:end],
            mask_image=1 - edits.keep_masks[start:end],
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="pt",
        )
        outputs.append(result.images.float().cpu())
    return inpainting_quality(torch.cat(outputs), edits)


def train_inpainting(
    config: InpaintTrainingConfig,
    output: Path,
    base: Path = assets.PIPELINE_DIR,
    fp16: bool = True,
) -> dict:
    """Run the recipe; returns (and writes) a report with timings and, if asked, the evaluation.

    Writes ``output/unet`` (the part that ships; ``install`` copies it into the package),
    ``output/pipeline`` (a standalone diffusers inpainting folder) and
    ``output/training_report.json``. An interrupted run resumes from ``output/checkpoint.pt``;
    a finished UNet with the same settings is reused, so only the export and evaluation rerun.
    """
    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    base_pipe = assets.load_pipeline(base)
    settings = _settings(config, base)
    marker = output / STAGE
    finished = json.loads(marker.read_text("utf-8")) if marker.is_file() else None
    if finished is None or finished["settings"] != settings or finished["fp16"] != fp16:
        data = prepare_data(base_pipe, render_dataset(config.dataset_size, config.seed))
        unet, seconds = train_inpainting_unet(base_pipe, data, config, output / CHECKPOINT, settings)
        dtype = torch.float16 if fp16 else torch.float32
        unet.to(dtype).save_pretrained(output / "unet", safe_serialization=True)
        finished = {"settings": settings, "fp16": fp16, "seconds": seconds}
        marker.write_text(json.dumps(finished), "utf-8")
        (output / CHECKPOINT).unlink(missing_ok=True)
    # The report measures what ships: the saved (fp16) UNet, loaded as users load it.
    pipe = export_pipeline(output / "pipeline", output / "unet", base, fp16)
    report: dict = {
        "config": asdict(config),
        "mask_mix": MASK_MIX,
        "seconds": {"train": finished["seconds"]},  # a reused UNet reports what it took when trained
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if config.eval_scenes:
        options = {"steps": config.eval_steps, "guidance": config.eval_guidance, "seed": config.seed}
        report["evaluation"] = {
            name: asdict(evaluate_inpainting(editor, config.eval_scenes, **options))
            for name, editor in (("inpainting", pipe), ("blended-base", blended_inpainting(base_pipe)))
        }
    # render, encoding, export and evaluation included
    report["seconds"]["run"] = time.perf_counter() - started
    (output / "training_report.json").write_text(json.dumps(report, indent=2), "utf-8")
    return report
