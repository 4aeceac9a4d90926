"""Diffusion-DPO: direct preference optimisation of a diffusion model on labelled image pairs
(Wallace, Dang, Rafailov, Zhou, Lou, Purushwalkam, Ermon, Xiong, Joty, Naik; "Diffusion Model
Alignment Using Direct Preference Optimization", CVPR 2024, arXiv 2311.12908).

DPO's objective for a preference x_w ≻ x_l given c, written with the diffusion ELBO (paper eq.
14): draw one timestep t ~ U(0, T) and one noise ε ~ N(0, I) **shared by the winner and the
loser**, noise both, x_t^w = α_t x_0^w + σ_t ε and x_t^l = α_t x_0^l + σ_t ε, and minimise

    L(θ) = −log σ( −β T ω(λ_t) · [ (‖ε − ε_θ(x_t^w, t)‖² − ‖ε − ε_ref(x_t^w, t)‖²)
                                  − (‖ε − ε_θ(x_t^l, t)‖² − ‖ε − ε_ref(x_t^l, t)‖²) ] ).

The model is pushed to denoise the winner better than the reference does, and the loser worse;
the reference is the pre-trained model, which keeps the update close to it (the KL term of DPO).

Conventions here, and why:
- **β is the authors' code's**: the squared errors are means over latent dimensions (as every
  diffusers training script computes the denoising loss), T ω(λ_t) is folded into β, and the
  logit is −(β/2)·[…], as in the authors' released ``train.py`` (its ``--beta_dpo``). The paper's
  β (eq. 14, with T ω(λ_t) written out) is therefore this β / 2. The authors' launchers
  (SalesforceAIResearch/DiffusionDPO, ``launchers/sd15.sh`` and ``sdxl.sh``) use β = 5000 in
  this convention for SD 1.5 and SDXL on Pick-a-Pic v2, with an effective batch of 2048 pairs,
  learning rate 1e-8 × 2048 = 2.048e-5 (``--scale_lr``), 2000 steps, a constant schedule after a
  linear warm-up (500 steps SD 1.5, 200 SDXL), a full fine-tune of the UNet in fp16.
- **The reference is the UNet with its LoRA adapter switched off** (no second copy in memory,
  as for DPOK and GRPO); a full fine-tune (``lora.enabled=false``) keeps a frozen copy.
- **Images are resized (shorter side) and centre-cropped** to the pipeline's resolution, and
  **never flipped**: the authors' script flips horizontally by default (``--no_hflip`` turns it
  off), which turns "a circle left of a square" into its opposite.
- **No learning-rate warm-up**: the loop's AdamW runs at a constant rate (the authors warm up
  over 200–500 steps of their 2000). VAE latents are sampled from the encoder's distribution (as the
  authors' code does), with the epoch's generator, so a resumed run repeats the uninterrupted one.
- The text encoder is frozen and the prompt is never dropped (no classifier-free-guidance
  dropout: the reference script's default).

**Flow-matching models** (Stable Diffusion 3, ``diffalign.flow``) run the same estimator on the
objective they were trained with, as Flow-DPO does (Liu et al. 2025, "Improving Video Generation
with Human Feedback", arXiv 2501.13918): one noise level s and one ε per pair, x_s = (1 − s) x_0 +
s ε, and squared errors of the predicted velocity against the target ε − x_0 (which differs between
winner and loser as their x_0 do) in place of the ε-errors above. s is drawn as SD3 was trained:
logit-normal (Esser et al. 2024, §3.1), moved by the scheduler's shift (``FlowFamily
.training_timesteps``). The VideoAlign authors derive a timestep-dependent β from the ELBO's
weighting and train with a constant one; so does diffalign. VAE latents are (z − shift) · scale for
SD3's VAE. The family (``diffalign.families``) supplies the timesteps, the noising, the target and
the unguided prediction, so the loss, the reference and the loop are shared.

Offline: an epoch draws ``dpo.pairs_per_epoch`` pairs (without repeats within an epoch) from the
preference data (``data``: a registered set such as ``shapes-prefs``, a Pick-a-Pic parquet
folder, or a JSONL file; ``diffalign.preferences``), and makes one optimiser step per
``train.batch_size × train.gradient_accumulation_steps`` pairs. Nothing is sampled during
training; the loop's fixed-noise evaluation scores the model as for every method.

Logged per epoch, because the loss alone says little (it sits near log 2 = 0.693 when the model
has not moved, and a near-zero loss can mean over-fitting as well as learning):
``implicit_accuracy`` (share of pairs whose logit is positive: the model prefers the winner more
than the reference does), ``reward_margin`` (the logit itself, the implicit reward of the winner
minus the loser's), ``chosen_error_vs_ref`` and ``rejected_error_vs_ref`` (the model's denoising
error minus the reference's, on winners and on losers: both below zero means the model got better
at everything, not just at telling the pair apart), and ``model_error`` (the plain denoising loss).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image

from diffalign import families
from diffalign.config import ConfigError, doc
from diffalign.families import Conditioning
from diffalign.optim.base import TrainContext, check_finite, clip_and_step, mean_over_processes, register
from diffalign.optim.dpok import adapter_disabled

if TYPE_CHECKING:
    from diffalign.config import TrainConfig
    from diffalign.preferences import PreferenceData, PreferencePair


@dataclass
class DPOSection:
    """Diffusion-DPO (Wallace et al. 2024): learn from labelled image pairs, offline."""

    beta: float = doc(
        2000.0,
        "DPO inverse temperature in the authors' code convention (logit = -beta/2 x the error difference; the "
        "paper's beta is half of it); the authors' SD 1.5 and SDXL runs on Pick-a-Pic used 5000",
    )
    pairs_per_epoch: int = doc(
        256,
        "preference pairs per epoch on each process (drawn without repeats within an epoch); optimiser steps "
        "per epoch = this / (train.batch_size x train.gradient_accumulation_steps)",
    )

    def validate(self, config: TrainConfig) -> None:
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be positive, got {self.beta}")
        if self.pairs_per_epoch < 1:
            raise ConfigError(f"dpo.pairs_per_epoch must be at least 1, got {self.pairs_per_epoch}")


@dataclass
class DPOTerms:
    """The loss of a batch of pairs and what it is made of (each ``[B]`` except ``loss``)."""

    loss: torch.Tensor  # scalar: mean of −log σ(logit)
    logit: torch.Tensor  # −β/2 · (model_diff − reference_diff): the implicit reward margin
    chosen_error_vs_ref: torch.Tensor  # ‖ε − ε_θ(x_w)‖² − ‖ε − ε_ref(x_w)‖²
    rejected_error_vs_ref: torch.Tensor  # the same on the loser
    model_error: torch.Tensor | None = None  # scalar: the model's plain denoising loss, winners and losers

    def metrics(self) -> dict[str, torch.Tensor]:
        return {
            "loss": self.loss.detach(),
            "implicit_accuracy": (self.logit > 0).float().mean().detach(),
            "reward_margin": self.logit.mean().detach(),
            "chosen_error_vs_ref": self.chosen_error_vs_ref.mean().detach(),
            "rejected_error_vs_ref": self.rejected_error_vs_ref.mean().detach(),
            **({"model_error": self.model_error.detach()} if self.model_error is not None else {}),
        }


def dpo_loss(
    model_chosen: torch.Tensor,
    model_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> DPOTerms:
    """The Diffusion-DPO loss from per-pair denoising errors ``[B]`` (mean squared error over latent
    dimensions of the model and of the reference, on winners and losers), in fp32."""
    chosen = model_chosen.float() - reference_chosen.float()
    rejected = model_rejected.float() - reference_rejected.float()
    logit = -0.5 * beta * (chosen - rejected)
    return DPOTerms(-F.logsigmoid(logit).mean(), logit, chosen, rejected)


def denoising_errors(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``‖target − prediction‖²`` averaged over latent dimensions, per sample: ``[B]`` in fp32."""
    return (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))


def pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """An image → ``[3, resolution, resolution]`` in [−1, 1]: shorter side resized, centre-cropped
    (never flipped: a flip reverses "left of")."""
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    if image.size != (resolution, resolution):
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return array.permute(2, 0, 1).float() / 127.5 - 1.0


def encode_images(
    pipe, images: list[Image.Image], resolution: int, generator: torch.Generator
) -> torch.Tensor:
    """VAE latents ``[B, C, h, w]`` of ``images`` (``pixels`` at ``resolution``), sampled from the
    encoder's distribution with ``generator`` (so a resumed run draws what the uninterrupted one did),
    in the denoiser's units: (z − shift) · scale, as the pipeline's decoder inverts it (SD3's VAE has
    a shift, SD 1.x/2.x's has none)."""
    batch = torch.stack([pixels(image, resolution) for image in images])
    batch = batch.to(pipe.vae.device, pipe.vae.dtype)
    config = pipe.vae.config
    with torch.no_grad():
        posterior = pipe.vae.encode(batch).latent_dist
        latents = posterior.sample(generator=generator)
        return (latents - (config.get("shift_factor", None) or 0.0)) * config.scaling_factor


def epoch_order(size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` indices into ``size`` pairs: one shuffled pass after another, so no pair repeats
    before every pair has been drawn once."""
    passes = -(-count // size)
    return torch.cat([torch.randperm(size, generator=generator) for _ in range(passes)])[:count]


@register
class DPO:
    """The Diffusion-DPO epoch: pairs → shared-noise denoising errors of model and reference → DPO loss."""

    name = "dpo"
    description = "Diffusion-DPO (Wallace et al. 2024): learn from labelled image pairs (offline; data=...)"
    section = DPOSection
    offline = True  # trains on config.data, not on rollouts rewarded online

    def __init__(self, context: TrainContext, config: TrainConfig):
        from diffalign.preferences import open_preferences

        self.context = context
        self.config = config
        self.data: PreferenceData = open_preferences(config.data, model=config.model)
        pipe = context.pipe
        self.family = families.of(pipe)
        self.denoiser = families.denoiser(pipe)  # unwrapped: its adapter is what the reference switches off
        self.resolution = self.denoiser.config.sample_size * pipe.vae_scale_factor
        # A full fine-tune has no adapter to switch off: keep the pre-trained denoiser beside it.
        self.frozen = None
        if not config.lora.enabled:
            self.frozen = copy.deepcopy(self.denoiser).requires_grad_(False).eval()

    @staticmethod
    def accumulation_steps(config: TrainConfig) -> int:
        return config.train.gradient_accumulation_steps

    @classmethod
    def validate(cls, config: TrainConfig) -> None:
        per_step = config.train.batch_size * config.train.gradient_accumulation_steps
        if config.dpo.pairs_per_epoch % per_step:
            raise ConfigError(
                f"dpo.pairs_per_epoch ({config.dpo.pairs_per_epoch}) must be divisible by train.batch_size x "
                f"train.gradient_accumulation_steps ({per_step}), so that no half-accumulated step crosses an epoch"
            )
        if config.exploration != "none":
            raise ConfigError(
                f"exploration {config.exploration!r} shapes online sampling; dpo samples nothing while it trains "
                "(set exploration=none)"
            )

    def latents(self, images: list[Image.Image], generator: torch.Generator) -> torch.Tensor:
        """VAE latents ``[B, C, h, w]`` of ``images``, sampled from the encoder's distribution."""
        return encode_images(self.context.pipe, images, self.resolution, generator)

    def terms(self, pairs: list[PreferencePair], generator: torch.Generator) -> DPOTerms:
        """The DPO loss of ``pairs`` under the current weights (with gradient)."""
        chosen = self.latents([pair.chosen for pair in pairs], generator)
        rejected = self.latents([pair.rejected for pair in pairs], generator)
        with torch.no_grad():
            conditioning = self.family.encode(self.context.pipe, [pair.prompt for pair in pairs], "")
        return self.loss_on_latents(chosen, rejected, conditioning, generator)

    def loss_on_latents(
        self,
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        conditioning: Conditioning,
        generator: torch.Generator,
    ) -> DPOTerms:
        """The DPO loss of winners ``chosen`` and losers ``rejected`` (VAE latents ``[B, C, h, w]``)
        for prompts encoded as ``conditioning`` (its conditional rows are used)."""
        context, family = self.context, self.family
        count = chosen.shape[0]
        # One noise and one timestep per pair, shared by its winner and loser (the paper's estimator).
        noise = torch.randn(chosen.shape, generator=generator, dtype=chosen.dtype).to(chosen.device)
        timesteps = family.training_timesteps(context.pipe, count, generator)
        latents = torch.cat([chosen, rejected])  # [2B, C, h, w]: winners, then losers
        noise, timesteps = torch.cat([noise, noise]), torch.cat([timesteps, timesteps]).to(chosen.device)
        noisy, target = family.noised(context.pipe, latents, noise, timesteps)
        both = torch.cat([torch.arange(count), torch.arange(count)])
        conditioning = conditioning.select(both)
        with context.accelerator.autocast():
            prediction = family.denoise(context.unet, noisy, timesteps, conditioning)
        with torch.no_grad(), context.accelerator.autocast():
            reference = self.reference(noisy, timesteps, conditioning)
        model_errors = denoising_errors(prediction, target)  # [2B]
        reference_errors = denoising_errors(reference, target)
        terms = dpo_loss(
            model_errors[:count],
            model_errors[count:],
            reference_errors[:count],
            reference_errors[count:],
            self.config.dpo.beta,
        )
        terms.model_error = model_errors.mean()
        return terms

    def reference(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        """The pre-trained model's prediction: the adapter switched off, or the frozen copy."""
        if self.frozen is not None:
            return self.family.denoise(self.frozen, noisy, timesteps, conditioning)
        with adapter_disabled(self.denoiser):
            return self.family.denoise(self.context.unet, noisy, timesteps, conditioning)

    def run_epoch(self, generator: torch.Generator) -> dict[str, float]:
        config, context = self.config, self.context
        started = time.perf_counter()
        order = epoch_order(len(self.data), config.dpo.pairs_per_epoch, generator).tolist()
        stats: dict[str, list[torch.Tensor]] = {}
        reading = 0.0
        batch_size = config.train.batch_size
        for start in range(0, len(order), batch_size):
            read_started = time.perf_counter()
            pairs = self.data.pairs(order[start : start + batch_size])
            reading += time.perf_counter() - read_started
            with context.accelerator.accumulate(context.unet):
                terms = self.terms(pairs, generator)
                check_finite(terms.loss, "DPO")
                context.accelerator.backward(terms.loss)
                clip_and_step(context, config.train.max_grad_norm)
            for name, value in terms.metrics().items():
                stats.setdefault(name, []).append(value)
        seconds = time.perf_counter() - started
        return {
            **mean_over_processes(context.accelerator, stats),
            "samples": len(order) * context.accelerator.num_processes,
            "sampling_seconds": reading,  # reading and decoding pairs: DPO samples nothing
            "training_seconds": seconds - reading,
        }

    def state_dict(self) -> dict:
        return {}  # the epoch's generator recreates the draw order; weights and optimiser are the loop's

    def load_state_dict(self, state: dict) -> None:
        pass
