"""DPOK: the KL to the pre-trained model, the replay buffer and the value baseline."""

import pytest
import torch

from diffalign import pipeline
from diffalign.config import ConfigError, load_config
from diffalign.optim.dpok import ReplayBuffer, ValueNetwork, adapter_disabled, kl_to_reference
from diffalign.sampling import ddim_posterior, guided_noise, sample


def _means(pipe, trajectory, step):
    pipe.scheduler.set_timesteps(trajectory.num_steps)
    latents, timestep = trajectory.latents[:, step], trajectory.timesteps[step]
    scales = trajectory.guidance_scales[:, step]

    def mean_of_step():
        noise = guided_noise(
            pipe.unet, latents, timestep, trajectory.prompt_embeds, trajectory.negative_prompt_embeds, scales
        )
        return ddim_posterior(pipe.scheduler, noise, timestep, latents, eta=1.0)

    mean, std = mean_of_step()
    with adapter_disabled(pipe.unet):
        reference, _ = mean_of_step()
    return mean, reference, std


@torch.no_grad()
def test_kl_to_pretrained_is_zero_at_adapter_init_and_positive_after_a_change():
    pipe = pipeline.load("tiny-random")
    pipeline.add_lora(pipe)
    trajectory = sample(
        pipe, ["a cat", "a dog"], num_steps=4, eta=1.0, generator=torch.Generator().manual_seed(0)
    )
    for step in range(4):
        mean, reference, std = _means(pipe, trajectory, step)
        assert torch.equal(kl_to_reference(mean, reference, std), torch.zeros(2))
    for name, parameter in pipe.unet.named_parameters():
        if "lora_B" in name:
            parameter.add_(0.05)
    mean, reference, std = _means(pipe, trajectory, 1)
    kl = kl_to_reference(mean, reference, std)
    assert (kl > 0).all()
    # Against the closed form computed independently with torch.distributions (per dimension, averaged).
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std.expand_as(mean)),
        torch.distributions.Normal(reference, std.expand_as(mean)),
    ).mean(dim=(1, 2, 3))
    torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-9)
    assert any(p.requires_grad for p in pipe.unet.parameters())  # adapter switched back on


def test_replay_buffer_keeps_recent_epochs_and_pairs_transitions_with_their_rewards():
    pipe = pipeline.load("tiny-random")
    buffer = ReplayBuffer(epochs=2)
    for epoch in range(3):
        trajectory = sample(
            pipe,
            [f"prompt {epoch} {i}" for i in range(3)],
            num_steps=3,
            generator=torch.Generator().manual_seed(epoch),
        )
        buffer.add(trajectory, trajectory.latents[:, 0].mean(dim=(1, 2, 3)))
    assert len(buffer.entries) == 2 and buffer.entries[0][0].prompts[0] == "prompt 1 0"
    assert buffer.entries[0][0].images.numel() == 0  # images are not kept
    batch, steps, rewards = buffer.draw(64, torch.Generator().manual_seed(0))
    assert len(batch) == 64 and steps.shape == (64,) and steps.max() < 3
    torch.testing.assert_close(batch.latents[:, 0].mean(dim=(1, 2, 3)), rewards)
    assert {p.split()[1] for p in batch.prompts} == {"1", "2"}


def test_value_network_fits_a_reward_of_the_latent():
    torch.manual_seed(0)
    value = ValueNetwork(latent_channels=4, text_width=32, width=32)
    optimizer = torch.optim.AdamW(value.parameters(), lr=3e-3)
    latents, embeds = torch.randn(64, 4, 8, 8), torch.randn(64, 5, 32)
    timesteps = torch.randint(0, 1000, (64,))
    target = latents[:, 0].mean(dim=(1, 2)) * 3
    first = torch.nn.functional.mse_loss(value(latents, timesteps, embeds), target).item()
    for _ in range(200):
        loss = torch.nn.functional.mse_loss(value(latents, timesteps, embeds), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first


def test_dpok_needs_lora():
    with pytest.raises(ConfigError, match="lora.enabled=true"):
        load_config(None, ["method=dpok", "lora.enabled=false"])
