"""Rectified-flow models (Stable Diffusion 3) as Gaussian policies: an SDE sampler with log-probs.

Stable Diffusion 3 (Esser et al. 2024, arXiv 2403.03206) samples by integrating the flow ODE
dx = v_θ(x, s) ds from s = 1 (noise) to s = 0 (data) with Euler steps
(``FlowMatchEulerDiscreteScheduler``). A deterministic step has no density, so policy-gradient
methods cannot score it. Flow-GRPO (Liu et al. 2025, arXiv 2505.05470, §4.2) and DanceGRPO
(Xue et al. 2025, arXiv 2505.07818) replace the ODE by a reverse-time SDE with the same
marginals, whose Euler–Maruyama step is Gaussian. The step is derived here from the model's
own parametrisation.

**Derivation.** Flow matching trains v_θ on x_s = (1 − s) x_0 + s ε (ε ~ N(0, I)) with target
ε − x_0, so v_θ(x, s) ≈ E[ε − x_0 | x_s = x]. Together with x = (1 − s) E[x_0 | x] + s E[ε | x]
this gives the denoiser and noise estimates

    x̂_0 = x − s v,        ε̂ = x + (1 − s) v,

and, as x_s given x_0 is N((1 − s) x_0, s² I), Tweedie's formula gives the score

    ∇ log p_s(x) = −ε̂ / s = −(x + (1 − s) v) / s.

The marginals p_s obey the continuity equation ∂_s p = −∇·(p v). For any g(s) ≥ 0 the forward
SDE dx = [v + ½ g² ∇log p_s] ds + g dw has the same marginals (its extra drift contributes
−∇·(½ g² p ∇log p) = −½ g² Δp, which the diffusion term +½ g² Δp cancels). Its time reversal
(Anderson 1982; Song et al. 2021, eq. 6), run with s decreasing, is
dx = [f − g² ∇log p_s] ds + g dw̄ with f the forward drift, that is

    dx = [v − ½ g² ∇log p_s] ds + g dw̄ = [v + g²/(2s) (x + (1 − s) v)] ds + g dw̄.

An Euler–Maruyama step from s to s' < s (Δ = s − s' > 0, ds = −Δ) is therefore the Gaussian

    x' ~ N( x − Δ [v + g²/(2s) (x + (1 − s) v)],  g² Δ I ).

With g = 0 it is exactly the scheduler's Euler step x' = x + (s' − s) v. We take Flow-GRPO's
noise schedule g(s) = a √(s / (1 − s)), for which the injected noise grows with the noise
already in x_s; ``a`` is the noise-level knob (``sample.eta``; Flow-GRPO used 0.7). At s = 1
the ratio is infinite, so there, as in Flow-GRPO's code, g takes the value of the schedule's
next sigma (a deviation from the continuous SDE at one point, not from its marginals' path).

Log-probs are the Gaussian log-density averaged over latent dimensions, in fp32, with the
DDIM sampler's convention (``diffalign.sampling.ddim_step_with_logprob``): 0 for a
deterministic step (a = 0).
"""

from __future__ import annotations

import math

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.utils.torch_utils import randn_tensor

from diffalign import families
from diffalign.families import Conditioning
from diffalign.sampling import quiet_truncation_warnings, warn_long_prompts

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
# diffusers' default length of SD3's T5 slot, which is zeros when the pipeline has no T5 encoder.
DEFAULT_MAX_SEQUENCE_LENGTH = 256
# A pipeline trained with another T5 slot length says so with this attribute (set by its loader).
SEQUENCE_LENGTH_ATTRIBUTE = "diffalign_max_sequence_length"
# Flow-GRPO's LoRA targets on SD3: the image and the text streams' attention projections.
FLOW_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


def sigmas_at(
    scheduler: FlowMatchEulerDiscreteScheduler, step: int | torch.Tensor, latents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, s')``: the sigma of step ``step`` (scalar or ``[B]``) and of the next one, ``[B, 1, ...]`` fp32."""
    if scheduler.sigmas is None or scheduler.timesteps is None or len(scheduler.sigmas) < 2:
        raise ValueError("call scheduler.set_timesteps(...) before a flow step")
    batch = latents.shape[0]
    step = torch.as_tensor(step, device=latents.device).long().reshape(-1).expand(batch)
    sigmas = scheduler.sigmas.to(device=latents.device, dtype=torch.float32)
    shape = (batch,) + (1,) * (latents.ndim - 1)
    return sigmas[step].reshape(shape), sigmas[step + 1].reshape(shape)


def flow_sde_transition(
    scheduler: FlowMatchEulerDiscreteScheduler,
    velocity: torch.Tensor,
    step: int | torch.Tensor,
    latents: torch.Tensor,
    noise_level: float = 0.7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian SDE step x_s → x_s' (module docstring): ``(mean  # like latents, fp32, std  # [B, 1, ...])``."""
    sigma, sigma_next = sigmas_at(scheduler, step, latents)
    x, v = latents.float(), velocity.float()
    delta = sigma - sigma_next  # > 0
    # g(s) = a √(s/(1−s)), with s = 1 replaced by the schedule's second sigma (Flow-GRPO).
    second = scheduler.sigmas[1].to(device=latents.device, dtype=torch.float32)
    capped = torch.where(sigma >= 1.0, second, sigma)
    g_squared = noise_level**2 * capped / (1 - capped)
    mean = x - delta * (v + g_squared / (2 * sigma) * (x + (1 - sigma) * v))
    std = (g_squared * delta).sqrt()
    return mean, std


def flow_sde_step_with_logprob(
    scheduler: FlowMatchEulerDiscreteScheduler,
    velocity: torch.Tensor,
    step: int | torch.Tensor,
    latents: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SDE step and its log-density; ``prev_sample`` given: re-score that step instead of sampling.

    Returns ``(prev_sample  # like latents, log_prob  # [B] fp32)``; with ``noise_level=0`` the
    step is the scheduler's Euler step and the log-prob 0.
    """
    mean, std = flow_sde_transition(scheduler, velocity, step, latents, noise_level)
    batch = latents.shape[0]
    if prev_sample is None:
        if noise_level > 0:
            noise = randn_tensor(
                latents.shape, generator=generator, device=latents.device, dtype=torch.float32
            )
            prev_sample = mean + std * noise
        else:
            prev_sample = mean
        prev_sample = prev_sample.to(latents.dtype)
    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    log_density = (
        -((prev_sample.detach().float() - mean) ** 2) / (2 * safe_std**2)
        - torch.log(safe_std)
        - _LOG_SQRT_2PI
    )
    log_prob = log_density.mean(dim=tuple(range(1, latents.ndim)))
    log_prob = torch.where(stochastic.reshape(batch), log_prob, torch.zeros_like(log_prob))
    return prev_sample, log_prob


def max_sequence_length(pipe: StableDiffusion3Pipeline) -> int:
    """The T5 slot length the pipeline's transformer was trained with (diffusers' 256 unless its loader said)."""
    return getattr(pipe, SEQUENCE_LENGTH_ATTRIBUTE, DEFAULT_MAX_SEQUENCE_LENGTH)


def dynamic_shift(pipe: StableDiffusion3Pipeline) -> float | None:
    """The resolution-dependent shift μ ``pipe(...)`` computes when the scheduler shifts dynamically
    (None when it has a fixed ``shift``)."""
    scheduler = pipe.scheduler
    if not scheduler.config.get("use_dynamic_shifting", None):
        return None
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    config = pipe.transformer.config
    tokens = (config.sample_size // config.patch_size) ** 2
    return calculate_shift(
        tokens,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.16),
    )


def shifted_sigmas(pipe: StableDiffusion3Pipeline, sigmas: torch.Tensor) -> torch.Tensor:
    """Noise levels ``sigmas`` in [0, 1] moved by the scheduler's shift as its sampling schedule is:
    s ↦ k s / (1 + (k − 1) s) for a fixed shift k, the scheduler's ``time_shift`` for a dynamic one."""
    scheduler = pipe.scheduler
    mu = dynamic_shift(pipe)
    if mu is not None:
        return scheduler.time_shift(mu, 1.0, sigmas)
    shift = scheduler.config.shift
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowFamily:
    """Stable Diffusion 3-style pipelines: an MM-DiT transformer predicting rectified-flow velocity."""

    name = "flow"
    denoiser_name = "transformer"
    sampler = "the rectified-flow SDE of diffalign.flow"
    supports_prompt_weighting = False  # DiffExp's compel phrase weights
    lora_targets = FLOW_LORA_TARGETS
    pipeline_class = StableDiffusion3Pipeline
    denoiser_class = SD3Transformer2DModel

    def matches(self, pipe) -> bool:
        return isinstance(pipe, StableDiffusion3Pipeline)

    def prepare_scheduler(self, pipe) -> None:
        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            from diffalign.pipeline import PipelineError

            raise PipelineError(
                f"the flow pipeline's scheduler is {type(pipe.scheduler).__name__}; diffalign's SDE sampler "
                "steps rectified flow with FlowMatchEulerDiscreteScheduler's sigmas"
            )

    def encode(self, pipe, prompts, negative_prompt: str = "") -> Conditioning:
        warn_long_prompts(pipe, [*prompts, negative_prompt])  # once per prompt, not at every call
        with quiet_truncation_warnings(pipe):
            cond, uncond, pooled, negative_pooled = pipe.encode_prompt(
                list(prompts),
                None,
                None,
                device=pipe.transformer.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=[negative_prompt] * len(prompts),
                max_sequence_length=max_sequence_length(pipe),
            )
        return Conditioning(cond, uncond, pooled, negative_pooled)

    def initial_latents(self, pipe, batch_size: int, generator=None) -> torch.Tensor:
        """Gaussian x_1 of the transformer's latent shape, drawn like ``pipe(...)`` draws it."""
        size = pipe.transformer.config.sample_size
        shape = (batch_size, pipe.transformer.config.in_channels, size, size)
        return randn_tensor(
            shape, generator=generator, device=pipe.transformer.device, dtype=pipe.transformer.dtype
        )

    def set_timesteps(self, pipe, num_steps: int) -> torch.Tensor:
        """The pipeline's own schedule: its shift, or the resolution-dependent shift ``pipe(...)`` computes."""
        mu = dynamic_shift(pipe)
        kwargs = {} if mu is None else {"mu": mu}
        pipe.scheduler.set_timesteps(num_steps, device=pipe.transformer.device, **kwargs)
        return pipe.scheduler.timesteps

    def predict(
        self, denoiser, latents, timestep, conditioning: Conditioning, guidance_scale
    ) -> torch.Tensor:
        """Classifier-free-guided velocity with one transformer call on the doubled batch."""
        batch = latents.shape[0]
        timestep = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(batch)
        velocity = denoiser(
            hidden_states=torch.cat([latents, latents]),
            timestep=torch.cat([timestep, timestep]),
            encoder_hidden_states=torch.cat([conditioning.negative_embeds, conditioning.embeds]),
            pooled_projections=torch.cat([conditioning.negative_pooled, conditioning.pooled]),
            return_dict=False,
        )[0]
        uncond, cond = velocity.chunk(2)
        scale = guidance_scale.to(velocity.dtype).reshape(batch, *([1] * (latents.ndim - 1)))
        return uncond + scale * (cond - uncond)

    def transition(self, scheduler, prediction, step, latents, noise_level):
        return flow_sde_transition(scheduler, prediction, step, latents, noise_level)

    def step_with_logprob(
        self, scheduler, prediction, step, latents, noise_level, prev_sample=None, generator=None
    ):
        return flow_sde_step_with_logprob(
            scheduler, prediction, step, latents, noise_level, prev_sample=prev_sample, generator=generator
        )

    def predict_clean(self, scheduler, prediction, step, latents) -> torch.Tensor:
        """x̂_0 = x − s v (fp32)."""
        sigma, _ = sigmas_at(scheduler, step, latents)
        return latents.float() - sigma * prediction.float()

    def decode(self, pipe, latents) -> torch.Tensor:
        """VAE-decode as ``StableDiffusion3Pipeline`` does (scale, then shift), to ``[B, 3, H, W]`` in [0, 1]."""
        config = pipe.vae.config
        latents = latents / config.scaling_factor + (config.shift_factor or 0.0)
        images = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def training_timesteps(self, pipe, count: int, generator: torch.Generator) -> torch.Tensor:
        """s = sigmoid(n), n ~ N(0, 1) — SD3's logit-normal sampling (Esser et al. 2024, §3.1, m = 0,
        std 1, the diffusers SD3 training scripts' default) — moved by the scheduler's shift as
        those scripts move it; returned as the transformer's timestep s · T (T = 1000)."""
        logistic = torch.sigmoid(torch.randn(count, generator=generator))
        return shifted_sigmas(pipe, logistic) * pipe.scheduler.config.num_train_timesteps

    def noised(self, pipe, clean, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """x_s = (1 − s) x_0 + s ε with s = t / T; the target is the velocity ε − x_0 (SD3 eq. 1–3)."""
        sigma = timesteps.to(clean.device, torch.float32) / pipe.scheduler.config.num_train_timesteps
        sigma = sigma.reshape(-1, *([1] * (clean.ndim - 1)))
        noisy = (1 - sigma) * clean.float() + sigma * noise.float()
        return noisy.to(clean.dtype), (noise.float() - clean.float()).to(clean.dtype)

    def denoise(self, denoiser, noisy, timesteps, conditioning: Conditioning) -> torch.Tensor:
        return denoiser(
            hidden_states=noisy,
            timestep=timesteps.to(noisy.device),
            encoder_hidden_states=conditioning.embeds,
            pooled_projections=conditioning.pooled,
            return_dict=False,
        )[0]


FAMILY = families.register(FlowFamily())


def tiny_random_flow_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A few-MB ``StableDiffusion3Pipeline`` with random weights: 32×32 images, 4×16×16 latents.

    The classes of SD3 (an MM-DiT ``SD3Transformer2DModel``, two CLIP text encoders with
    projection, ``FlowMatchEulerDiscreteScheduler`` with SD3's shift of 3), scaled down so that
    tests take seconds; no T5 encoder, as SD3 allows (its slot is zeros, here of length 4).
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diffalign.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=16,
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
        shift_factor=0.0,  # SD3's VAE config has one; the pipeline adds it when decoding
    )

    def text_encoder() -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(
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

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder(),
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder(),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    setattr(pipe, SEQUENCE_LENGTH_ATTRIBUTE, 4)
    return pipe
