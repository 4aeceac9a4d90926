"""Sampling that records what policy-gradient methods need: every latent and log-prob.

DDPO (Black et al. 2023) and DPOK (Fan et al. 2023) treat each DDIM step with η > 0 as a
Gaussian policy p(x_{t-1} | x_t, c). ``ddim_step_with_logprob`` is the scheduler's own step
plus the log-density of the step it took; ``sample`` runs a whole batch and returns a
``Trajectory``, the one data type handed from sampling to every online optimizer. ``sample``
works on every model family (``diffalign.families``): this module is the UNet/DDIM family,
``diffalign.flow`` the rectified-flow SDE of Stable Diffusion 3-style models.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from diffalign import families
from diffalign.families import Conditioning

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
# The attention projections of the UNet: the LoRA targets used by DDPO, AlignProp and diffusers' scripts.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
logger = logging.getLogger(__name__)


@dataclass
class Trajectory:
    """A batch of sampled denoising chains, everything needed to re-score or reward them.

    ``guidance_scales`` is per sample and per step so that exploration schedules (DiffExp)
    are replayed exactly when the optimizer recomputes log-probs.
    """

    prompts: list[str]
    latents: torch.Tensor  # [B, T+1, C, h, w]: x_T, ..., x_0
    log_probs: torch.Tensor  # [B, T] fp32: log p(x_{t-1} | x_t, c) under the sampling weights
    timesteps: torch.Tensor  # [T] the scheduler's timesteps, shared by the batch
    prompt_embeds: torch.Tensor  # [B, L, D] conditional text embeddings
    negative_prompt_embeds: torch.Tensor  # [B, L, D] unconditional embeddings for CFG
    guidance_scales: torch.Tensor  # [B, T] classifier-free guidance scale used at each step
    eta: float  # the sampler's noise level: DDIM's η, or the flow SDE's a (diffalign.flow)
    images: torch.Tensor  # [B, 3, H, W] decoded x_0 in [0, 1]
    pooled_prompt_embeds: torch.Tensor | None = None  # [B, P] pooled text vectors (SD3-style models)
    negative_pooled_prompt_embeds: torch.Tensor | None = None  # [B, P]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    def select(self, index: torch.Tensor) -> Trajectory:
        """The sub-batch at positions ``index`` (a 1-D long tensor)."""
        values = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "prompts":
                value = [value[i] for i in index.tolist()]
            elif isinstance(value, torch.Tensor) and field.name != "timesteps":
                value = value[index.to(value.device)]
            values[field.name] = value
        return Trajectory(**values)

    @staticmethod
    def concat(parts: Sequence[Trajectory]) -> Trajectory:
        """Join batches sampled with the same schedule into one."""
        first = parts[0]
        values = {}
        for field in fields(first):
            items = [getattr(part, field.name) for part in parts]
            if field.name == "prompts":
                values[field.name] = [prompt for item in items for prompt in item]
            elif field.name in ("timesteps", "eta") or items[0] is None:
                values[field.name] = items[0]
            else:
                values[field.name] = torch.cat(items)
        return Trajectory(**values)


def predict_original(
    scheduler: DDIMScheduler, noise_pred: torch.Tensor, alpha_prod_t: torch.Tensor, latents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-step estimates ``(x̂_0, ε̂)`` (fp32, like ``latents``) from a UNet output at ᾱ_t.

    ``alpha_prod_t`` is ᾱ_t broadcastable to ``latents`` (``[B, 1, ...]``). Follows the
    scheduler's prediction type and its clipping or thresholding of x̂_0, as ``DDIMScheduler.step``.
    """
    beta_prod_t = 1 - alpha_prod_t
    # fp32 throughout: log-probs of nearby policies differ in the 4th decimal.
    sample = latents.float()
    model_output = noise_pred.float()
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
    elif prediction_type == "v_prediction":
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")

    if scheduler.config.thresholding:
        pred_original_sample = scheduler._threshold_sample(pred_original_sample)
    elif scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        pred_original_sample = pred_original_sample.clamp(-limit, limit)

    return pred_original_sample, pred_epsilon


def alpha_cumprod_at(
    scheduler: DDIMScheduler, timestep: int | torch.Tensor, latents: torch.Tensor
) -> torch.Tensor:
    """ᾱ_t of ``timestep`` (scalar or ``[B]``) shaped ``[B, 1, ...]`` to broadcast against ``latents``."""
    batch = latents.shape[0]
    timestep = torch.as_tensor(timestep, device=latents.device).long().reshape(-1).expand(batch)
    alphas = scheduler.alphas_cumprod.to(latents.device)[timestep]
    return alphas.reshape((batch,) + (1,) * (latents.ndim - 1))


def ddim_posterior(
    scheduler: DDIMScheduler,
    noise_pred: torch.Tensor,
    timestep: int | torch.Tensor,
    latents: torch.Tensor,
    eta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian DDIM-η transition p(x_{t-1} | x_t): ``(mean  # like latents, fp32, std  # [B, 1, ...])``.

    Follows the scheduler's config (prediction type, clipping or thresholding of x̂_0, the
    final alpha). ``timestep`` is a scalar or one timestep per sample (``[B]``).
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(...) before a DDIM step")
    batch = latents.shape[0]
    device = latents.device
    timestep = torch.as_tensor(timestep, device=device).long().reshape(-1).expand(batch)
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps

    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    final_alpha = torch.as_tensor(scheduler.final_alpha_cumprod, device=device, dtype=alphas_cumprod.dtype)
    alpha_prod_t = alphas_cumprod[timestep]
    alpha_prod_t_prev = torch.where(
        prev_timestep >= 0, alphas_cumprod[prev_timestep.clamp(min=0)], final_alpha
    )
    broadcast = (batch,) + (1,) * (latents.ndim - 1)
    alpha_prod_t = alpha_prod_t.reshape(broadcast)
    alpha_prod_t_prev = alpha_prod_t_prev.reshape(broadcast)

    pred_original_sample, pred_epsilon = predict_original(scheduler, noise_pred, alpha_prod_t, latents)

    # The DDIM posterior variance σ_t² (Song et al. 2021, eq. 16), as in DDIMScheduler._get_variance.
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction

    return prev_sample_mean, std_dev_t


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    noise_pred: torch.Tensor,
    timestep: int | torch.Tensor,
    latents: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t → x_{t-1} and the log-density of the step, as ``DDIMScheduler.step`` does it.

    The transition is ``ddim_posterior``'s Gaussian. When ``prev_sample`` is given the step is not sampled but re-scored: that is how optimizers
    recompute the probability of a stored transition under new weights.

    The log-prob is the Gaussian log-density averaged over latent dimensions (the
    convention of DDPO's reference code, which is why PPO clip ranges around 1e-4 work),
    computed in fp32. A deterministic step (η = 0) has no density; its log-prob is 0 by
    convention and RL methods refuse η = 0 when validating their config.

    Returns ``(prev_sample  # like latents, log_prob  # [B] fp32)``.
    """
    prev_sample_mean, std_dev_t = ddim_posterior(scheduler, noise_pred, timestep, latents, eta)
    batch = latents.shape[0]
    if prev_sample is None:
        if eta > 0:
            noise = randn_tensor(
                noise_pred.shape, generator=generator, device=latents.device, dtype=noise_pred.dtype
            )
            prev_sample = prev_sample_mean + std_dev_t * noise
        else:
            prev_sample = prev_sample_mean
        prev_sample = prev_sample.to(latents.dtype)

    stochastic = std_dev_t > 0
    safe_std = torch.where(stochastic, std_dev_t, torch.ones_like(std_dev_t))
    log_density = (
        -((prev_sample.detach().float() - prev_sample_mean) ** 2) / (2 * safe_std**2)
        - torch.log(safe_std)
        - _LOG_SQRT_2PI
    )
    log_prob = log_density.mean(dim=tuple(range(1, latents.ndim)))
    log_prob = torch.where(stochastic.reshape(batch), log_prob, torch.zeros_like(log_prob))
    return prev_sample, log_prob


def warn_long_prompts(pipe: StableDiffusionPipeline, prompts: Sequence[str]) -> None:
    """Warn once per prompt (per pipeline) that the text encoder will cut it at its token limit.

    diffusers says so at every call, which in a training run repeats the same prompt's warning
    thousands of times; the set of prompts already reported lives on the pipeline.
    """
    reported = pipe.__dict__.setdefault("_diffalign_long_prompts", set())
    tokenizer = pipe.tokenizer
    # transformers' own "sequence length is longer than..." notice says the same once per tokenizer,
    # less clearly (SD3 has up to three tokenizers).
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        notices = getattr(getattr(pipe, name, None), "deprecation_warnings", {})
        notices["sequence-length-is-longer-than-the-specified-maximum"] = True
    limit = tokenizer.model_max_length
    for prompt in dict.fromkeys(prompts):
        if prompt in reported:
            continue
        ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
        if len(ids) > limit:
            reported.add(prompt)
            kept = tokenizer.decode(ids[1 : limit - 1])
            logger.warning(
                "prompt %r has %d tokens but the text encoder reads %d: only %r is used (reported once per prompt)",
                prompt if len(prompt) <= 200 else prompt[:200] + "...",
                len(ids),
                limit,
                kept,
            )


@contextmanager
def quiet_truncation_warnings(pipe) -> Iterator[None]:
    """Silence the per-call truncation warning of ``pipe``'s diffusers module (its logger is named
    after the module) while ``warn_long_prompts`` speaks once per prompt instead."""
    pipeline_logger = logging.getLogger(type(pipe).__module__)
    level = pipeline_logger.level
    pipeline_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pipeline_logger.setLevel(level)


def encode_prompts(
    pipe: StableDiffusionPipeline, prompts: Sequence[str], negative_prompt: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings ``(cond, uncond)  # [B, L, D] each`` with the pipeline's own encoder."""
    warn_long_prompts(pipe, [*prompts, negative_prompt])
    with quiet_truncation_warnings(pipe):
        cond, uncond = pipe.encode_prompt(
            list(prompts),
            device=pipe.unet.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=[negative_prompt] * len(prompts),
        )
    return cond, uncond


def guided_noise(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    guidance_scale: torch.Tensor,
) -> torch.Tensor:
    """Classifier-free-guided noise prediction with one UNet call on the doubled batch.

    ``latents  # [B, C, h, w]``, ``timestep`` scalar or ``[B]``, ``guidance_scale  # [B]``.
    """
    batch = latents.shape[0]
    timestep = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(batch)
    noise = unet(
        torch.cat([latents, latents]),
        torch.cat([timestep, timestep]),
        encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]),
        return_dict=False,
    )[0]
    uncond, cond = noise.chunk(2)
    scale = guidance_scale.to(noise.dtype).reshape(batch, *([1] * (latents.ndim - 1)))
    return uncond + scale * (cond - uncond)


def decode_latents(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode ``latents  # [B, C, h, w]`` to images ``[B, 3, H, W]`` in [0, 1]."""
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def initial_latents(
    pipe: StableDiffusionPipeline, batch_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian x_T of the pipeline's latent shape, drawn like ``pipe(...)`` draws it."""
    size = pipe.unet.config.sample_size
    shape = (batch_size, pipe.unet.config.in_channels, size, size)
    latents = randn_tensor(shape, generator=generator, device=pipe.unet.device, dtype=pipe.unet.dtype)
    return latents * pipe.scheduler.init_noise_sigma


class DDIMFamily:
    """Stable Diffusion 1.x/2.x-style pipelines: a UNet predicting noise (or v), stepped by DDIM-η."""

    name = "ddim"
    denoiser_name = "unet"
    sampler = "DDIM-η"
    supports_prompt_weighting = True  # DiffExp's compel phrase weights
    lora_targets = DEFAULT_LORA_TARGETS

    denoiser_class = UNet2DConditionModel
    pipeline_class = StableDiffusionPipeline

    def matches(self, pipe) -> bool:
        return isinstance(getattr(pipe, "unet", None), UNet2DConditionModel)

    def prepare_scheduler(self, pipe) -> None:
        """Turn the pipeline's scheduler into DDIM with the same noise schedule, or refuse."""
        from diffalign.pipeline import ddim_scheduler_for

        pipe.scheduler = ddim_scheduler_for(pipe)

    def encode(self, pipe, prompts, negative_prompt: str = "") -> Conditioning:
        return Conditioning(*encode_prompts(pipe, prompts, negative_prompt))

    def initial_latents(self, pipe, batch_size: int, generator=None) -> torch.Tensor:
        return initial_latents(pipe, batch_size, generator)

    def set_timesteps(self, pipe, num_steps: int) -> torch.Tensor:
        pipe.scheduler.set_timesteps(num_steps, device=pipe.unet.device)
        return pipe.scheduler.timesteps

    def predict(
        self, denoiser, latents, timestep, conditioning: Conditioning, guidance_scale
    ) -> torch.Tensor:
        return guided_noise(
            denoiser, latents, timestep, conditioning.embeds, conditioning.negative_embeds, guidance_scale
        )

    def transition(self, scheduler, prediction, step, latents, noise_level):
        return ddim_posterior(
            scheduler, prediction, _timestep_of(scheduler, step, latents), latents, noise_level
        )

    def step_with_logprob(
        self, scheduler, prediction, step, latents, noise_level, prev_sample=None, generator=None
    ):
        return ddim_step_with_logprob(
            scheduler,
            prediction,
            _timestep_of(scheduler, step, latents),
            latents,
            eta=noise_level,
            prev_sample=prev_sample,
            generator=generator,
        )

    def predict_clean(self, scheduler, prediction, step, latents) -> torch.Tensor:
        timestep = _timestep_of(scheduler, step, latents)
        clean, _ = predict_original(
            scheduler, prediction, alpha_cumprod_at(scheduler, timestep, latents), latents
        )
        return clean

    def decode(self, pipe, latents) -> torch.Tensor:
        return decode_latents(pipe, latents)

    def training_timesteps(self, pipe, count: int, generator: torch.Generator) -> torch.Tensor:
        """Uniform over the DDPM training timesteps 0 … T − 1 (Ho et al. 2020, Algorithm 1)."""
        return torch.randint(0, pipe.scheduler.config.num_train_timesteps, (count,), generator=generator)

    def noised(self, pipe, clean, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε; the target is ε, or v for a v-prediction model."""
        scheduler = pipe.scheduler
        timesteps = timesteps.to(clean.device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            return noisy, scheduler.get_velocity(clean, noise, timesteps)
        return noisy, noise

    def denoise(self, denoiser, noisy, timesteps, conditioning: Conditioning) -> torch.Tensor:
        return denoiser(
            noisy, timesteps.to(noisy.device), encoder_hidden_states=conditioning.embeds, return_dict=False
        )[0]


def _timestep_of(scheduler, step: int | torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The scheduler's timestep of step index ``step`` (scalar or ``[B]``), on ``latents``' device."""
    return scheduler.timesteps.to(latents.device)[torch.as_tensor(step, device=latents.device).long()]


DDIM_FAMILY = families.register(DDIMFamily())


@torch.no_grad()
def sample(
    pipe,
    prompts: Sequence[str],
    *,
    num_steps: int = 20,
    guidance_scale: float | torch.Tensor = 5.0,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    negative_prompt: str = "",
    prompt_embeds: torch.Tensor | None = None,
    stochastic_steps: tuple[int, int] | None = None,
) -> Trajectory:
    """Sample one batch with the pipeline family's stochastic sampler and record the whole chain.

    A UNet pipeline samples with DDIM-η, a Stable Diffusion 3-style pipeline with the
    rectified-flow SDE of ``diffalign.flow`` (``eta`` is then its noise level).
    ``guidance_scale`` is a number, or a ``[B, T]`` tensor of per-sample per-step scales
    (exploration schedules). ``prompt_embeds`` replaces the encoder's conditional embeddings
    (weighted prompts). With ``eta=0`` and the same ``latents`` this reproduces ``pipe(...)``.
    ``stochastic_steps=(first, last)`` samples only those steps (0-based, inclusive) with ``eta``
    and the others deterministically (η = 0, log-prob 0): MixGRPO's window (Li et al. 2025,
    arXiv 2507.21802), which confines the randomness a reward can be credited to. ``Trajectory.eta``
    is then the window's η.
    """
    family = families.of(pipe)
    denoiser = getattr(pipe, family.denoiser_name)
    batch = len(prompts)
    device = denoiser.device
    conditioning = family.encode(pipe, prompts, negative_prompt)
    if prompt_embeds is not None:
        conditioning.embeds = prompt_embeds.to(device=device, dtype=conditioning.embeds.dtype)
    timesteps = family.set_timesteps(pipe, num_steps)
    scales = torch.as_tensor(guidance_scale, dtype=torch.float32, device=device)
    scales = scales.expand(batch, len(timesteps)) if scales.ndim == 0 else scales.to(device)
    if scales.shape != (batch, len(timesteps)):
        raise ValueError(
            f"guidance_scale must be a number or [{batch}, {len(timesteps)}], got {tuple(scales.shape)}"
        )
    if latents is None:
        latents = family.initial_latents(pipe, batch, generator)
    all_latents = [latents]
    all_log_probs = []
    first, last = stochastic_steps if stochastic_steps is not None else (0, len(timesteps) - 1)
    for step, timestep in enumerate(timesteps):
        # (DDIM's and flow matching's schedulers do not scale the model input: no scale_model_input.)
        prediction = family.predict(denoiser, latents, timestep, conditioning, scales[:, step])
        latents, log_prob = family.step_with_logprob(
            pipe.scheduler,
            prediction,
            step,
            latents,
            eta if first <= step <= last else 0.0,
            generator=generator,
        )
        all_latents.append(latents)
        all_log_probs.append(log_prob)
    return Trajectory(
        prompts=list(prompts),
        latents=torch.stack(all_latents, dim=1),
        log_probs=torch.stack(all_log_probs, dim=1),
        timesteps=timesteps.clone(),
        prompt_embeds=conditioning.embeds,
        negative_prompt_embeds=conditioning.negative_embeds,
        guidance_scales=scales.clone(),
        eta=eta,
        images=family.decode(pipe, latents),
        pooled_prompt_embeds=conditioning.pooled,
        negative_pooled_prompt_embeds=conditioning.negative_pooled,
    )
