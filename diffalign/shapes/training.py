"""Training ShapesWorld's models from scratch: a CLIP model, a VAE, then a text-conditioned UNet.

The recipe is Stable Diffusion's, scaled down: CLIP is trained contrastively on rendered
scenes and their captions (Radford et al. 2021); the VAE reconstructs scenes through a
4×8×8 latent with a small KL term (Rombach et al. 2022); the UNet learns ε-prediction on VAE
latents, conditioned on the frozen CLIP text tower's hidden states, with 10 % of captions
dropped so that classifier-free guidance works (Ho & Salimans 2022). Only train-split
compositions are ever rendered, so held-out prompts stay unseen.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from diffalign import pipeline
from diffalign.shapes import models
from diffalign.shapes.splits import training_pairs
from diffalign.tokenizer import clip_tokenizer


@dataclass
class ShapesTrainingConfig:
    """Hyperparameters of the from-scratch recipe (defaults: the shipped models)."""

    seed: int = 0
    dataset_size: int = 20_000  # rendered (image, caption) pairs shared by all three stages
    clip_steps: int = 1_000
    clip_batch_size: int = 128
    clip_learning_rate: float = 1e-3
    vae_steps: int = 500  # flat-coloured scenes reconstruct well early; the VAE is the costliest per step
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6  # SD's VAE: a nearly deterministic autoencoder with a tidy latent scale
    unet_steps: int = 3_000
    unet_batch_size: int = 64
    unet_learning_rate: float = 5e-4
    caption_dropout: float = 0.1
    ema_decay: float = 0.999


@dataclass
class Dataset:
    images: torch.Tensor  # [N, 3, 32, 32] float in [0, 1]
    captions: list[str]


def render_dataset(size: int, seed: int) -> Dataset:
    """``size`` random train-split scenes with captions, reproducibly from ``seed``."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for image, caption in tqdm(
        training_pairs(size, rng, models.IMAGE_SIZE), total=size, desc="render scenes"
    ):
        images.append(image)
        captions.append(caption)
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return Dataset(stacked, captions)


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=models.TOKEN_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images → CLIP's normalised input (the scenes are already at the model's size)."""
    mean = torch.tensor(models.CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(models.CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def clipped_step(
    loss: torch.Tensor, model: torch.nn.Module, optimizer, schedule, max_norm: float = 1.0
) -> None:
    """Backward, clip the gradient norm, step the optimiser and its schedule, clear gradients."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()


def train_clip(data: Dataset, config: ShapesTrainingConfig, generator: torch.Generator) -> CLIPModel:
    """Contrastive training; captions repeated within a batch count as positives of each other."""
    model = models.new_clip()
    tokenizer = clip_tokenizer(models.TOKEN_LENGTH)
    position = {caption: i for i, caption in enumerate(sorted(set(data.captions)))}
    caption_index = torch.tensor([position[c] for c in data.captions])
    token_ids = tokenize(tokenizer, data.captions)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.clip_learning_rate, weight_decay=0.1)
    schedule = get_cosine_schedule_with_warmup(optimizer, 100, config.clip_steps)
    model.train()
    bar = tqdm(range(config.clip_steps), desc="train CLIP")
    for _ in bar:
        batch = torch.randint(len(data.captions), (config.clip_batch_size,), generator=generator)
        output = model(input_ids=token_ids[batch], pixel_values=clip_pixels(data.images[batch]))
        same = caption_index[batch][:, None] == caption_index[batch][None, :]
        targets = same.float() / same.float().sum(dim=1, keepdim=True)
        loss = (
            F.cross_entropy(output.logits_per_image, targets)
            + F.cross_entropy(output.logits_per_text, targets)
        ) / 2
        clipped_step(loss, model, optimizer, schedule)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def text_encoder_from(clip: CLIPModel) -> CLIPTextModel:
    """The CLIP text tower as a standalone ``CLIPTextModel``, the class SD pipelines expect."""
    encoder = CLIPTextModel(clip.config.text_config)
    if isinstance(clip.text_model, CLIPTextModel):  # transformers 5 nests the whole model
        encoder.load_state_dict(clip.text_model.state_dict())
    else:  # transformers 4 nests only the transformer
        encoder.text_model.load_state_dict(clip.text_model.state_dict())
    return encoder.eval()


def train_vae(data: Dataset, config: ShapesTrainingConfig, generator: torch.Generator) -> AutoencoderKL:
    """Reconstruction (L1 + L2) plus a small KL; the latent scale factor is set from the data."""
    vae = models.new_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate)
    schedule = get_cosine_schedule_with_warmup(optimizer, 100, config.vae_steps)
    vae.train()
    bar = tqdm(range(config.vae_steps), desc="train VAE")
    for _ in bar:
        batch = (
            data.images[torch.randint(len(data.images), (config.vae_batch_size,), generator=generator)] * 2
            - 1
        )
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = (
            F.mse_loss(reconstruction, batch)
            + F.l1_loss(reconstruction, batch)
            + config.vae_kl_weight * posterior.kl().mean()
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        sample = data.images[: min(2048, len(data.images))] * 2 - 1
        spread = vae.encode(sample).latent_dist.mean.std().item()
    # As in SD: scale latents to unit variance so the diffusion noise schedule fits them.
    vae.register_to_config(scaling_factor=1.0 / spread)
    return vae


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds of every image, so the UNet stage never runs the encoder."""
    means, stds = [], []
    for start in tqdm(range(0, len(images), 256), desc="encode latents"):
        posterior = vae.encode(images[start : start + 256] * 2 - 1).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(
    data: Dataset,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    config: ShapesTrainingConfig,
    generator: torch.Generator,
) -> UNet2DConditionModel:
    """ε-prediction on scaled VAE latents, frozen text encoder, caption dropout, EMA weights."""
    unet = models.new_unet()
    scheduler = pipeline.sd_ddim_scheduler()
    tokenizer = clip_tokenizer(models.TOKEN_LENGTH)
    unique = sorted(set(data.captions) | {""})
    with torch.no_grad():
        embeddings = text_encoder(tokenize(tokenizer, unique))[0]  # [U, L, D]
    position = {caption: i for i, caption in enumerate(unique)}
    caption_index = torch.tensor([position[c] for c in data.captions])
    empty = position[""]
    means, stds = encode_dataset(vae, data.images)
    scale = vae.config.scaling_factor
    alphas = scheduler.alphas_cumprod
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.unet_learning_rate, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, 200, config.unet_steps)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay)
    unet.train()
    bar = tqdm(range(config.unet_steps), desc="train UNet")
    for _ in bar:
        batch = torch.randint(len(data.captions), (config.unet_batch_size,), generator=generator)
        latents = (means[batch] + stds[batch] * torch.randn(means[batch].shape, generator=generator)) * scale
        conditions = caption_index[batch].clone()
        dropped = torch.rand(len(batch), generator=generator) < config.caption_dropout
        conditions[dropped] = empty
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
        alpha = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        prediction = unet(noisy, timesteps, encoder_hidden_states=embeddings[conditions]).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(unet.parameters())
    return unet.eval()


def save_models(clip: CLIPModel, pipe: StableDiffusionPipeline, folder: Path, fp16: bool = True) -> None:
    """``folder/clip`` (CLIPModel) and ``folder/pipeline`` (a diffusers pipeline), safetensors."""
    dtype = torch.float16 if fp16 else torch.float32
    clip.to(dtype).save_pretrained(folder / "clip", safe_serialization=True)
    clip_tokenizer(models.TOKEN_LENGTH).save_pretrained(folder / "clip")
    pipe.to(dtype).save_pretrained(folder / "pipeline", safe_serialization=True)
    clip.float()
    pipe.to(torch.float32)


def _stage_settings(config: ShapesTrainingConfig, prefix: str) -> dict:
    settings = {k: v for k, v in asdict(config).items() if k.startswith(prefix)}
    settings.update(seed=config.seed, dataset_size=config.dataset_size)
    return settings


def _cached_stage(folder: Path, settings: dict, load):
    """``(model, seconds it took to train)`` when the stage was trained with the same settings
    (resumes a long recipe), else None."""
    marker = folder / "stage.json"
    if marker.is_file():
        saved = json.loads(marker.read_text("utf-8"))
        if saved["settings"] == settings:
            return load(folder), saved["seconds"]
    return None


def _run_stage(folder: Path, settings: dict, load, train) -> tuple:
    """Load a finished stage or train it and keep it; returns ``(model, training seconds)``."""
    cached = _cached_stage(folder, settings, load)
    if cached is not None:
        return cached
    started = time.perf_counter()
    model = train()
    seconds = time.perf_counter() - started
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "stage.json").write_text(json.dumps({"settings": settings, "seconds": seconds}), "utf-8")
    return model, seconds


def train_all(config: ShapesTrainingConfig, folder: Path, fp16: bool = True) -> dict:
    """Run the whole recipe and save the models; returns (and writes) a timing report.

    Each finished stage is kept under ``folder/stages``; running again with the same settings
    skips it, so an interrupted recipe resumes at the stage it was in.
    """
    torch.manual_seed(config.seed)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    data = render_dataset(config.dataset_size, config.seed)
    seconds["render"] = time.perf_counter() - started
    stages = folder / "stages"

    clip, seconds["clip"] = _run_stage(
        stages / "clip",
        _stage_settings(config, "clip"),
        CLIPModel.from_pretrained,
        lambda: train_clip(data, config, torch.Generator().manual_seed(config.seed)),
    )
    vae, seconds["vae"] = _run_stage(
        stages / "vae",
        _stage_settings(config, "vae"),
        AutoencoderKL.from_pretrained,
        lambda: train_vae(data, config, torch.Generator().manual_seed(config.seed + 1)),
    )
    stage = time.perf_counter()
    text_encoder = text_encoder_from(clip.eval())
    unet = train_unet(data, vae.eval(), text_encoder, config, torch.Generator().manual_seed(config.seed + 2))
    seconds["unet"] = time.perf_counter() - stage
    folder.mkdir(parents=True, exist_ok=True)
    pipe = pipeline.assemble(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(models.TOKEN_LENGTH), unet=unet
    )
    save_models(clip, pipe, folder, fp16=fp16)
    seconds["total"] = sum(seconds.values())  # stages reused from an earlier run count what they took then
    report = {
        "config": asdict(config),
        "seconds": seconds,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    (folder / "training_report.json").write_text(json.dumps(report, indent=2), "utf-8")
    return report
