"""``shapes-flow``: a Stable Diffusion 3-style ShapesWorld model, trained with rectified flow matching.

The recipe is SD3's (Esser et al. 2024, arXiv 2403.03206), scaled down to ShapesWorld: an MM-DiT
``SD3Transformer2DModel`` learns the velocity v = ε − x_0 of x_s = (1 − s) x_0 + s ε on the shipped
VAE's latents (§2, eq. 1–3), with s drawn from the logit-normal density of §3.1 (m = 0, std 1, the
paper's best), conditioned on two CLIP text encoders as SD3 is (the token embeddings of both
concatenated channel-wise, their pooled projections concatenated as the vector condition), with 10 %
of captions dropped so that classifier-free guidance works (SD3 drops each encoder's text
independently; with two towers of one world we drop both together). EMA weights are kept.

What is ShapesWorld's: the two text encoders are the shipped ShapesWorld CLIP's text tower and the
hard-negative fine-tune's (``shapes-negclip``), each with its text projection; there is no T5
(SD3 allows dropping it: its slot is zeros), and the zero slot is one token long instead of
diffusers' default 256, which would make the joint attention over 16 image tokens sixteen times
costlier for no information. The pipeline folder is a plain ``StableDiffusion3Pipeline`` (loads
with ``from_pretrained``); call it with ``max_sequence_length=1`` as diffalign does (the loader of
``shapes-flow`` sets it). The scheduler is ``FlowMatchEulerDiscreteScheduler`` with shift 1: SD3's
shift of 3 moves steps towards noise for 1024² images whose many tokens keep more signal at a
given s; 16 tokens need no shift. Images are 32×32 like the UNet model's; latents 4×8×8, patches
of 2×2 (16 tokens).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPTextModelWithProjection

from diffalign.flow import SEQUENCE_LENGTH_ATTRIBUTE
from diffalign.shapes import models
from diffalign.tokenizer import clip_tokenizer

# The length of SD3's T5 slot (zeros: no T5) the shipped transformer was trained with.
MAX_SEQUENCE_LENGTH = 1
WIDTH = 128  # transformer width: 4 heads × 32


@dataclass
class FlowTrainingConfig:
    """Hyperparameters of the recipe (defaults: the shipped ``shapes-flow``)."""

    seed: int = 0
    dataset_size: int = 20_000  # rendered (image, caption) pairs, as the UNet model's recipe
    steps: int = 8_000
    batch_size: int = 64
    learning_rate: float = 5e-4
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    logit_mean: float = 0.0  # SD3 §3.1: s = sigmoid(N(m, std²))
    logit_std: float = 1.0


def new_transformer() -> SD3Transformer2DModel:
    """An 8-layer MM-DiT of width 128 on 4×8×8 latents in 2×2 patches (16 image tokens)."""
    return SD3Transformer2DModel(
        sample_size=models.LATENT_SIZE,
        patch_size=2,
        in_channels=4,
        num_layers=8,
        attention_head_dim=32,
        num_attention_heads=WIDTH // 32,
        joint_attention_dim=2 * models.TEXT_WIDTH,  # the two towers' token embeddings side by side
        caption_projection_dim=WIDTH,
        pooled_projection_dim=2 * 64,  # the two towers' 64-d text projections side by side
        out_channels=4,
        pos_embed_max_size=models.LATENT_SIZE // 2,
    )


def text_encoder_with_projection(clip: CLIPModel) -> CLIPTextModelWithProjection:
    """The CLIP text tower and its projection as the ``CLIPTextModelWithProjection`` SD3 reads."""
    encoder = CLIPTextModelWithProjection(clip.config.text_config)
    text_model = clip.text_model.text_model if hasattr(clip.text_model, "text_model") else clip.text_model
    encoder.text_model.load_state_dict(text_model.state_dict())
    encoder.text_projection.load_state_dict(clip.text_projection.state_dict())
    return encoder.eval()


def flow_vae(vae: AutoencoderKL) -> AutoencoderKL:
    """The shipped VAE with SD3's ``shift_factor`` (0: its latents are centred by construction)."""
    copy = AutoencoderKL.from_config({**vae.config, "shift_factor": 0.0})
    copy.load_state_dict(vae.state_dict())
    return copy.eval()


def assemble(
    transformer: SD3Transformer2DModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModelWithProjection,
    text_encoder_2: CLIPTextModelWithProjection,
) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(models.TOKEN_LENGTH),
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(models.TOKEN_LENGTH),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    setattr(pipe, SEQUENCE_LENGTH_ATTRIBUTE, MAX_SEQUENCE_LENGTH)
    return pipe


@torch.no_grad()
def encode_captions(pipe: StableDiffusion3Pipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens  # [U, L, D], pooled  # [U, P])`` of ``captions`` exactly as the pipeline encodes them."""
    tokens, pooled = [], []
    for start in range(0, len(captions), 256):
        embeds, _, vector, _ = pipe.encode_prompt(
            captions[start : start + 256],
            None,
            None,
            do_classifier_free_guidance=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        tokens.append(embeds)
        pooled.append(vector)
    return torch.cat(tokens), torch.cat(pooled)


def train_transformer(
    pipe: StableDiffusion3Pipeline, data, config: FlowTrainingConfig, generator: torch.Generator
) -> tuple[SD3Transformer2DModel, list[float]]:
    """Rectified flow matching (SD3 eq. 3 with logit-normal s) on the VAE's scaled latents."""
    from diffalign.shapes.training import encode_dataset

    transformer = pipe.transformer
    unique = sorted(set(data.captions) | {""})
    tokens, pooled = encode_captions(pipe, unique)
    position = {caption: i for i, caption in enumerate(unique)}
    caption_index = torch.tensor([position[c] for c in data.captions])
    empty = position[""]
    means, stds = encode_dataset(pipe.vae, data.images)
    scale = pipe.vae.config.scaling_factor
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.learning_rate, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, 200, config.steps)
    ema = EMAModel(transformer.parameters(), decay=config.ema_decay)
    transformer.train()
    losses = []
    bar = tqdm(range(config.steps), desc="train flow transformer")
    for _ in bar:
        batch = torch.randint(len(data.captions), (config.batch_size,), generator=generator)
        clean = (means[batch] + stds[batch] * torch.randn(means[batch].shape, generator=generator)) * scale
        conditions = caption_index[batch].clone()
        conditions[torch.rand(len(batch), generator=generator) < config.caption_dropout] = empty
        noise = torch.randn(clean.shape, generator=generator)
        normal = torch.randn(len(batch), generator=generator) * config.logit_std + config.logit_mean
        sigma = torch.sigmoid(normal).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * clean + sigma * noise
        velocity = transformer(
            hidden_states=noisy,
            timestep=sigma.flatten() * pipe.scheduler.config.num_train_timesteps,
            encoder_hidden_states=tokens[conditions],
            pooled_projections=pooled[conditions],
            return_dict=False,
        )[0]
        loss = F.mse_loss(velocity.float(), noise - clean)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        ema.step(transformer.parameters())
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(transformer.parameters())
    return transformer.eval(), losses


def build_untrained(seed: int = 0) -> StableDiffusion3Pipeline:
    """The pipeline with the shipped VAE and text encoders and a freshly initialised transformer."""
    from diffalign.shapes import assets

    torch.manual_seed(seed)
    base = assets.load_pipeline()
    clip, _ = assets.load_clip(assets.CLIP_DIR)
    negclip, _ = assets.load_clip(assets.NEGCLIP_DIR)
    return assemble(
        new_transformer(),
        flow_vae(base.vae),
        text_encoder_with_projection(clip),
        text_encoder_with_projection(negclip),
    )


def train_flow_model(config: FlowTrainingConfig, output: Path, fp16: bool = True) -> dict:
    """Train the transformer, save ``output/pipeline`` and ``output/training_report.json``; returns the report."""
    from diffalign.shapes.training import render_dataset

    started = time.perf_counter()
    pipe = build_untrained(config.seed)
    data = render_dataset(config.dataset_size, config.seed)
    transformer, losses = train_transformer(
        pipe, data, config, torch.Generator().manual_seed(config.seed + 3)
    )
    seconds = time.perf_counter() - started
    output.mkdir(parents=True, exist_ok=True)
    pipe.to(torch.float16 if fp16 else torch.float32).save_pretrained(
        output / "pipeline", safe_serialization=True
    )
    report = {
        "config": asdict(config),
        "train_seconds": seconds,
        "torch_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in transformer.parameters()),
        "losses": losses[:: max(1, len(losses) // 100)],
    }
    (output / "training_report.json").write_text(json.dumps(report, indent=2), "utf-8")
    return report


def install(pipeline_folder: Path) -> None:
    """Make the pipeline in ``pipeline_folder`` the shipped ``shapes-flow`` (replacing the old one whole)."""
    import shutil

    from diffalign import outputs
    from diffalign.shapes import assets

    with outputs.staging_folder(assets.FLOW_DIR) as staging:
        shutil.copytree(pipeline_folder, staging, dirs_exist_ok=True)
