"""DDPO's pieces against independent computations."""

import pytest
import torch
from accelerate import Accelerator

from diffalign import pipeline, rewards
from diffalign.optim.base import TrainContext, collect_rollouts
from diffalign.optim.ddpo import PerPromptStatTracker, ppo_clip_loss
from diffalign.sampling import ddim_step_with_logprob, guided_noise


def test_stat_tracker_normalises_per_prompt_once_it_has_enough():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    prompts = ["a", "a", "b", "b"]
    rewards_ = torch.tensor([1.0, 3.0, 10.0, 30.0])
    advantages = tracker.update(prompts, rewards_)
    # Two rewards per prompt reach min_count: per-prompt statistics.
    torch.testing.assert_close(advantages, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    # A new prompt with one reward falls back to the batch statistics.
    advantages = tracker.update(["c", "a"], torch.tensor([5.0, 2.0]))
    batch = torch.tensor([5.0, 2.0])
    expected_c = (5.0 - batch.mean()) / batch.std(unbiased=False)
    assert advantages[0].item() == pytest.approx(expected_c.item(), rel=1e-4)
    history_a = torch.tensor([1.0, 3.0, 2.0])
    expected_a = (2.0 - history_a.mean()) / history_a.std(unbiased=False)
    assert advantages[1].item() == pytest.approx(expected_a.item(), rel=1e-4)


def test_stat_tracker_state_round_trip():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
    tracker.update(["a", "a", "a", "a"], torch.arange(4.0))
    restored = PerPromptStatTracker(buffer_size=3, min_count=1)
    restored.load_state_dict(tracker.state_dict())
    assert list(restored.history["a"]) == [1.0, 2.0, 3.0]
    assert torch.equal(
        restored.update(["a"], torch.tensor([7.0])), tracker.update(["a"], torch.tensor([7.0]))
    )


def test_ppo_clip_loss_matches_hand_computation():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.05]))
    advantages = torch.tensor([1.0, 1.0, -1.0, 2.0])
    loss, stats = ppo_clip_loss(new, old, advantages, clip_range=0.1)
    # max(-A r, -A clip(r)): [-1, -1.1, 0.9 (-(-1)*0.9 vs 0.5 -> 0.9), -2.1]
    expected = torch.tensor([-1.0, -1.1, 0.9, -2.1]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_importance_ratio_is_exactly_one_before_the_first_update():
    """Re-scoring every stored step in training mode reproduces the sampler: bit for bit in the
    sampling batch's layout, and to fp32 rounding in another layout (on some CPUs the kernels a
    batch of 2 and a batch of 6 run round differently, by ~4e-7 in the log-prob)."""
    pipe = pipeline.load("tiny-random")
    pipeline.add_lora(pipe)
    accelerator = Accelerator()
    reward = rewards.build("jpeg-compressibility")
    context = TrainContext(pipe, pipe.unet, None, accelerator, reward, ["a cat", "a dog", "a fox"], [])
    trajectory, _ = collect_rollouts(
        context,
        batch_size=6,
        num_batches=1,
        images_per_prompt=2,
        shared_initial_noise=True,
        num_steps=5,
        guidance_scale=5.0,
        eta=1.0,
        negative_prompt="",
        generator=torch.Generator().manual_seed(0),
    )
    pipe.unet.train()
    for step in range(5):  # the sampling layout: all six images at once
        every = torch.full((6,), step)
        noise = guided_noise(
            pipe.unet,
            trajectory.latents[:, step],
            trajectory.timesteps[every],
            trajectory.prompt_embeds,
            trajectory.negative_prompt_embeds,
            trajectory.guidance_scales[:, step],
        )
        _, log_prob = ddim_step_with_logprob(
            pipe.scheduler,
            noise,
            trajectory.timesteps[every],
            trajectory.latents[:, step],
            eta=1.0,
            prev_sample=trajectory.latents[:, step + 1],
        )
        assert torch.equal(log_prob, trajectory.log_probs[:, step])
    step_order = torch.stack(
        [torch.randperm(5, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    )
    for start in range(0, 6, 2):
        rows = torch.arange(start, start + 2)
        for position in range(5):
            step = step_order[rows, position]
            noise = guided_noise(
                pipe.unet,
                trajectory.latents[rows, step],
                trajectory.timesteps[step],
                trajectory.prompt_embeds[rows],
                trajectory.negative_prompt_embeds[rows],
                trajectory.guidance_scales[rows, step],
            )
            _, log_prob = ddim_step_with_logprob(
                pipe.scheduler,
                noise,
                trajectory.timesteps[step],
                trajectory.latents[rows, step],
                eta=1.0,
                prev_sample=trajectory.latents[rows, step + 1],
            )
            ratio = torch.exp(log_prob - trajectory.log_probs[rows, step])
            assert (ratio - 1).abs().max() < 1e-5
