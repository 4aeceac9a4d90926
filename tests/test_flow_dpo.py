"""Diffusion-DPO on rectified-flow models (Flow-DPO): the training target and timesteps against
diffusers and independent math, the loss against a hand computation with a separately loaded
reference, VAE latents in the transformer's units, and learning and training end to end."""

import math

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from PIL import Image
from test_dpo import TINY, learning_probe, separable_pairs

from diffalign import families, pipeline
from diffalign.config import load_config
from diffalign.flow import shifted_sigmas
from diffalign.optim.dpo import DPO, encode_images
from diffalign.train import build_context, train

# The UNet tests' tiny job, on the tiny SD3 pipeline.
FLOW_DPO = [*(override for override in TINY if not override.startswith("model=")), "model=tiny-random-flow"]


def _config(tmp_path, name, *extra):
    data = separable_pairs(tmp_path / "data")
    return load_config(None, [*FLOW_DPO, f"data={data}", f"output_dir={tmp_path / name}", *extra])


def _perturb_adapter(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move the adapter off its zero start so that it changes predictions
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_training_timesteps_are_logit_normal_moved_by_the_schedulers_shift(shift):
    pipe = pipeline.load("tiny-random-flow")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    family = families.of(pipe)
    timesteps = family.training_timesteps(pipe, 4096, torch.Generator().manual_seed(0))
    logistic = torch.sigmoid(torch.randn(4096, generator=torch.Generator().manual_seed(0)))
    expected = shift * logistic / (1 + (shift - 1) * logistic) * 1000
    torch.testing.assert_close(timesteps, expected)
    assert 0 < timesteps.min() and timesteps.max() < 1000
    # The shift is the scheduler's own: its training table of sigmas is the uniform grid shifted.
    grid = torch.linspace(1, 1000, 1000) / 1000
    torch.testing.assert_close(shifted_sigmas(pipe, grid).flip(0), pipe.scheduler.sigmas[:1000])
    if shift == 1.0:  # unshifted logit-normal: its median is s = 1/2
        assert timesteps.median().item() == pytest.approx(500, abs=25)
    else:  # a shift of 3 moves training towards noise
        assert timesteps.median().item() == pytest.approx(750, abs=25)


def test_noised_latents_and_velocity_target_are_rectified_flows():
    pipe = pipeline.load("tiny-random-flow")
    generator = torch.Generator().manual_seed(1)
    clean, noise = (
        torch.randn(3, 4, 16, 16, generator=generator),
        torch.randn(3, 4, 16, 16, generator=generator),
    )
    timesteps = torch.tensor([0.0, 250.0, 1000.0])
    noisy, target = families.of(pipe).noised(pipe, clean, noise, timesteps)
    torch.testing.assert_close(noisy[0], clean[0])  # s = 0: the data
    torch.testing.assert_close(noisy[1], 0.75 * clean[1] + 0.25 * noise[1])
    torch.testing.assert_close(noisy[2], noise[2])  # s = 1: pure noise
    torch.testing.assert_close(target, noise - clean)
    # The target is what a perfect model's Euler step needs: x_s − s·v recovers the data.
    torch.testing.assert_close(noisy[1] - 0.25 * target[1], clean[1])


def test_flow_dpo_loss_matches_a_hand_computation_with_a_separately_loaded_reference(tmp_path):
    config = _config(tmp_path, "hand", "dpo.beta=300")
    context = build_context(config)
    method = DPO(context, config)
    transformer = context.pipe.transformer
    _perturb_adapter(transformer)
    base = pipeline.load("tiny-random-flow", seed=config.seed).transformer  # the same weights, never adapted
    generator = torch.Generator().manual_seed(5)
    chosen, rejected = (
        torch.randn(2, 4, 16, 16, generator=generator),
        torch.randn(2, 4, 16, 16, generator=generator),
    )
    conditioning = families.of(context.pipe).encode(context.pipe, ["a red circle", "a blue square"], "")
    with torch.no_grad():
        terms = method.loss_on_latents(chosen, rejected, conditioning, torch.Generator().manual_seed(9))

    # By hand: the same draws in the same order (noise, then the logit-normal timesteps; shift 3).
    draws = torch.Generator().manual_seed(9)
    noise = torch.randn(chosen.shape, generator=draws)
    logistic = torch.sigmoid(torch.randn(2, generator=draws))
    sigma = 3 * logistic / (1 + 2 * logistic)
    errors = {}
    for name, clean in (("w", chosen), ("l", rejected)):
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * clean + s * noise
        velocity = noise - clean
        for who, model in (("model", transformer), ("ref", base)):
            with torch.no_grad():
                prediction = model(
                    hidden_states=noisy,
                    timestep=sigma * 1000,
                    encoder_hidden_states=conditioning.embeds,
                    pooled_projections=conditioning.pooled,
                ).sample
            errors[who, name] = ((prediction - velocity) ** 2).mean(dim=(1, 2, 3))
    logit = (
        -300 / 2 * ((errors["model", "w"] - errors["ref", "w"]) - (errors["model", "l"] - errors["ref", "l"]))
    )
    # (batched and unbatched fp32 forwards differ by ~1e-7 per error; β/2 = 150 scales that up)
    torch.testing.assert_close(terms.logit, logit, rtol=1e-3, atol=1e-4)
    assert terms.loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(logit).mean().item(), rel=1e-4)
    assert terms.logit.abs().min() > 1e-2  # the adapter really moved the model off the reference


def test_encoded_images_are_in_the_transformers_units_whatever_the_vae_shift():
    """SD3's VAE subtracts a shift before scaling; the decoder adds it back, so images encoded for
    DPO must decode to the same picture whether or not the VAE has a shift."""
    pipe = pipeline.load("tiny-random-flow")
    image = Image.new("RGB", (32, 32), (200, 60, 40))
    plain = encode_images(pipe, [image], 32, torch.Generator().manual_seed(0))
    shifted_vae = AutoencoderKL.from_config({**pipe.vae.config, "shift_factor": 0.4})
    shifted_vae.load_state_dict(pipe.vae.state_dict())
    shifted = StableDiffusion3Pipeline(**{**pipe.components, "vae": shifted_vae})
    moved = encode_images(shifted, [image], 32, torch.Generator().manual_seed(0))
    scale = pipe.vae.config.scaling_factor
    torch.testing.assert_close(moved, plain - 0.4 * scale)
    family = families.of(pipe)
    with torch.no_grad():
        torch.testing.assert_close(family.decode(shifted, moved), family.decode(pipe, plain))


def test_flow_dpo_learns_a_separable_preference(tmp_path):
    """Red beats blue: after a few epochs the model prefers the winner more than the reference does,
    on fixed noise and timesteps (at the start it is the reference: logit 0, loss log 2)."""
    config = _config(tmp_path, "learn", "train.learning_rate=3e-3", "dpo.beta=500", "lora.rank=8")
    method = DPO(build_context(config), config)
    before, curve = learning_probe(method, epochs=16, every=4)
    assert before == (0.0, 0.0, pytest.approx(math.log(2)))
    margins = [margin for _, margin, _ in curve]
    assert margins == sorted(margins)  # the margin grows at every probe
    accuracy, margin, loss = curve[-1]
    assert accuracy >= 0.75 and margin > 0.5 and loss < math.log(2) - 0.1


def test_diffalign_train_runs_dpo_on_a_flow_model_and_resumes_exactly(tmp_path):
    whole = train(_config(tmp_path, "whole", "epochs=2"), progress=False)
    assert [record["epoch"] for record in whole.history] == [0, 1, 2]
    assert all(math.isfinite(record["loss"]) for record in whole.history[1:])
    state, _ = StableDiffusion3Pipeline.lora_state_dict(str(whole.lora_dir), return_lora_metadata=True)
    assert state and all(key.startswith("transformer.") for key in state)
    train(_config(tmp_path, "split", "epochs=1"), progress=False)
    resumed = train(_config(tmp_path, "split", "epochs=2"), resume=True, progress=False)
    for key in ("loss", "reward_margin", "chosen_error_vs_ref"):
        assert resumed.history[-1][key] == pytest.approx(whole.history[-1][key], rel=1e-5, abs=1e-9), key


def test_a_full_fine_tune_of_a_flow_model_keeps_a_frozen_transformer(tmp_path):
    config = _config(tmp_path, "full", "lora.enabled=false")
    method = DPO(build_context(config), config)
    assert isinstance(method.frozen, type(method.denoiser)) and method.frozen is not method.denoiser
    assert not any(parameter.requires_grad for parameter in method.frozen.parameters())
