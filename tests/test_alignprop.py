"""AlignProp: gradients reach the LoRA weights only through the last K denoising steps."""

import pytest
import torch
from accelerate import Accelerator

from diffalign import pipeline
from diffalign.config import ConfigError, load_config
from diffalign.families import Conditioning
from diffalign.optim.alignprop import AlignProp, GradientWindow, differentiable_sample
from diffalign.optim.base import TrainContext
from diffalign.sampling import encode_prompts, guided_noise, initial_latents

PROMPTS = ["a cat", "a dog"]
STEPS = 6


def _lora_pipe():
    pipe = pipeline.load("tiny-random")
    pipeline.add_lora(pipe)
    with torch.no_grad():  # non-zero B so that every LoRA matrix receives gradient
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return pipe


def _lora_grads(pipe) -> dict[str, torch.Tensor]:
    grads = {
        n: p.grad.clone() for n, p in pipe.unet.named_parameters() if p.requires_grad and p.grad is not None
    }
    pipe.unet.zero_grad(set_to_none=True)
    return grads


def _alignprop_grads(pipe, window_steps: int) -> tuple[dict, list[bool]]:
    context = TrainContext(pipe, pipe.unet, None, Accelerator(), None, PROMPTS, [])
    cond, uncond = encode_prompts(pipe, PROMPTS)
    grad_modes: list[bool] = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args: grad_modes.append(torch.is_grad_enabled())
    )
    images = differentiable_sample(
        context,
        Conditioning(cond, uncond),
        torch.full((2, STEPS), 5.0),
        num_steps=STEPS,
        eta=0.0,
        window=GradientWindow(window_steps, checkpointed=True),
        generator=torch.Generator().manual_seed(0),
    )
    calls_while_sampling = list(grad_modes)
    images.mean().backward()
    hook.remove()
    return _lora_grads(pipe), calls_while_sampling


def _reference_grads(pipe, window_steps: int) -> dict:
    """The same objective computed with diffusers' own DDIMScheduler.step, early steps detached."""
    cond, uncond = encode_prompts(pipe, PROMPTS)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    latents = initial_latents(pipe, 2, torch.Generator().manual_seed(0))
    scale = torch.full((2,), 5.0)
    for step, timestep in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(step >= STEPS - window_steps):
            noise = guided_noise(pipe.unet, latents, timestep, cond, uncond, scale)
            latents = scheduler.step(noise, timestep, latents, eta=0.0).prev_sample
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    (images / 2 + 0.5).clamp(0, 1).mean().backward()
    return _lora_grads(pipe)


def test_gradients_flow_only_through_the_last_k_steps():
    pipe = _lora_pipe()
    ours, grad_modes = _alignprop_grads(pipe, window_steps=2)
    assert grad_modes == [False] * (STEPS - 2) + [True] * 2
    reference = _reference_grads(pipe, window_steps=2)
    assert ours.keys() == reference.keys() and len(ours) > 0
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-7, msg=name)
    longer = _reference_grads(pipe, window_steps=3)  # the check is sensitive to one more step
    assert any(not torch.allclose(ours[n], longer[n], rtol=1e-3, atol=1e-6) for n in ours)


def test_random_truncation_draws_k_in_range_reproducibly():
    config = load_config(
        None,
        [
            "method=alignprop",
            "model=tiny-random",
            "reward=aesthetic",
            "alignprop.truncation_steps=5",
            "eval.prompt_sets=[]",
            "eval.rewards=[]",
        ],
    )
    method = AlignProp(None, config)
    draws = [method.truncation(torch.Generator().manual_seed(s)) for s in range(40)]
    assert set(draws) == {1, 2, 3, 4, 5}
    assert draws == [method.truncation(torch.Generator().manual_seed(s)) for s in range(40)]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reward=jpeg-compressibility"], "not differentiable. Differentiable rewards: .*shapes-clip"),
        (["reward=shapes-oracle"], "not differentiable"),
        (["alignprop.truncation_steps=21"], r"between 1 and sample.num_steps \(20\)"),
    ],
)
def test_bad_alignprop_settings_are_rejected_before_training(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["method=alignprop", *overrides])
