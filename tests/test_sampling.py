"""The sampler must be the scheduler's own step plus an exact log-density."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffalign import sampling


def _scheduler(**config) -> DDIMScheduler:
    base = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }
    base.update(config)
    scheduler = DDIMScheduler(**base)
    scheduler.set_timesteps(10)
    return scheduler


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample", "clip_sample": True},
        {"set_alpha_to_one": True, "steps_offset": 0},
    ],
)
@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
def test_step_matches_scheduler_step(config, eta):
    scheduler = _scheduler(**config)
    latents = torch.randn(3, 4, 8, 8)
    noise_pred = torch.randn(3, 4, 8, 8)
    for timestep in scheduler.timesteps[[0, 5, -1]]:
        ours, _ = sampling.ddim_step_with_logprob(
            scheduler, noise_pred, timestep, latents, eta=eta, generator=torch.Generator().manual_seed(1)
        )
        theirs = scheduler.step(
            noise_pred, timestep, latents, eta=eta, generator=torch.Generator().manual_seed(1)
        )
        torch.testing.assert_close(ours, theirs.prev_sample, rtol=0, atol=1e-6)


def test_log_prob_is_the_gaussian_density_averaged_over_dimensions():
    scheduler = _scheduler()
    latents, noise_pred = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timestep = scheduler.timesteps[3]
    eta = 0.8
    prev, log_prob = sampling.ddim_step_with_logprob(scheduler, noise_pred, timestep, latents, eta=eta)
    # Independent computation: the mean is the scheduler's step with zero noise, the std η·σ_t.
    mean = scheduler.step(
        noise_pred, timestep, latents, eta=eta, variance_noise=torch.zeros_like(latents)
    ).prev_sample
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    std = eta * math.sqrt(scheduler._get_variance(timestep, prev_timestep))
    normal = torch.distributions.Normal(mean.double(), std)
    expected = normal.log_prob(prev.double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-4, atol=1e-4)
    assert log_prob.dtype == torch.float32 and log_prob.shape == (2,)


def test_per_sample_timesteps_equal_separate_calls():
    scheduler = _scheduler()
    latents, noise_pred, prev = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = scheduler.timesteps[[0, 4, 9]]
    _, together = sampling.ddim_step_with_logprob(scheduler, noise_pred, timesteps, latents, prev_sample=prev)
    for i, timestep in enumerate(timesteps):
        _, alone = sampling.ddim_step_with_logprob(
            scheduler, noise_pred[i : i + 1], timestep, latents[i : i + 1], prev_sample=prev[i : i + 1]
        )
        torch.testing.assert_close(together[i : i + 1], alone)


def test_requires_set_timesteps():
    scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        sampling.ddim_step_with_logprob(scheduler, torch.zeros(1, 4, 2, 2), 10, torch.zeros(1, 4, 2, 2))


def test_eta_zero_reproduces_stock_pipeline(tiny_pipe):
    prompts = ["a cat", "a dog on a red sofa"]
    latents = sampling.initial_latents(tiny_pipe, 2, torch.Generator().manual_seed(0))
    trajectory = sampling.sample(
        tiny_pipe, prompts, num_steps=8, guidance_scale=7.5, eta=0.0, latents=latents
    )
    stock = tiny_pipe(
        prompts, num_inference_steps=8, guidance_scale=7.5, eta=0.0, latents=latents, output_type="pt"
    ).images
    torch.testing.assert_close(trajectory.images, stock, rtol=0, atol=1e-6)


def test_trajectory_shapes_and_exact_rescoring(tiny_pipe):
    prompts = ["a cat", "a dog", "a fox"]
    trajectory = sampling.sample(
        tiny_pipe, prompts, num_steps=6, eta=1.0, generator=torch.Generator().manual_seed(3)
    )
    assert trajectory.latents.shape == (3, 7, 4, 16, 16)
    assert trajectory.log_probs.shape == (3, 6)
    assert trajectory.images.shape == (3, 3, 32, 32)
    assert 0 <= trajectory.images.min() and trajectory.images.max() <= 1
    with torch.no_grad():
        for step, timestep in enumerate(trajectory.timesteps):
            noise = sampling.guided_noise(
                tiny_pipe.unet,
                trajectory.latents[:, step],
                timestep,
                trajectory.prompt_embeds,
                trajectory.negative_prompt_embeds,
                trajectory.guidance_scales[:, step],
            )
            _, log_prob = sampling.ddim_step_with_logprob(
                tiny_pipe.scheduler,
                noise,
                timestep,
                trajectory.latents[:, step],
                eta=1.0,
                prev_sample=trajectory.latents[:, step + 1],
            )
            assert torch.equal(log_prob, trajectory.log_probs[:, step])


def test_sampling_is_seeded(tiny_pipe):
    first = sampling.sample(tiny_pipe, ["a cat"], num_steps=4, generator=torch.Generator().manual_seed(5))
    second = sampling.sample(tiny_pipe, ["a cat"], num_steps=4, generator=torch.Generator().manual_seed(5))
    third = sampling.sample(tiny_pipe, ["a cat"], num_steps=4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first.images, second.images)
    assert not torch.equal(first.images, third.images)


def test_select_and_concat_round_trip(tiny_pipe):
    trajectory = sampling.sample(
        tiny_pipe, ["a", "b", "c"], num_steps=3, generator=torch.Generator().manual_seed(0)
    )
    order = torch.tensor([2, 0, 1])
    picked = trajectory.select(order)
    assert picked.prompts == ["c", "a", "b"]
    assert torch.equal(picked.latents[0], trajectory.latents[2])
    joined = sampling.Trajectory.concat(
        [trajectory.select(torch.tensor([0])), trajectory.select(torch.tensor([1, 2]))]
    )
    assert torch.equal(joined.log_probs, trajectory.log_probs)
