"""ReFL: the reward is read from x̂_0 at one drawn step, and the gradient reaches the LoRA weights
only through that step's UNet call."""

import pytest
import torch
from accelerate import Accelerator
from test_alignprop import PROMPTS, STEPS, _lora_grads, _lora_pipe

from diffalign.config import ConfigError, load_config
from diffalign.families import Conditioning
from diffalign.optim.base import TrainContext
from diffalign.optim.refl import ReFL, x0_at_step
from diffalign.sampling import encode_prompts, guided_noise, initial_latents

ETA = 1.0  # stochastic early steps: the noise draws must follow the scheduler's too


def _refl_images(pipe, gradient_step: int):
    context = TrainContext(pipe, pipe.unet, None, Accelerator(), None, PROMPTS, [])
    cond, uncond = encode_prompts(pipe, PROMPTS)
    grad_modes: list[bool] = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args: grad_modes.append(torch.is_grad_enabled())
    )
    images = x0_at_step(
        context,
        Conditioning(cond, uncond),
        torch.full((2, STEPS), 5.0),
        num_steps=STEPS,
        eta=ETA,
        gradient_step=gradient_step,
        checkpointed=True,
        generator=torch.Generator().manual_seed(0),
    )
    hook.remove()
    return images, grad_modes


def _reference_images(pipe, gradient_step: int):
    """The same prediction made with diffusers' DDIMScheduler.step and its pred_original_sample."""
    cond, uncond = encode_prompts(pipe, PROMPTS)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    generator = torch.Generator().manual_seed(0)
    latents = initial_latents(pipe, 2, generator)
    scale = torch.full((2,), 5.0)
    for step, timestep in enumerate(scheduler.timesteps[: gradient_step + 1]):
        with torch.set_grad_enabled(step == gradient_step):
            noise = guided_noise(pipe.unet, latents, timestep, cond, uncond, scale)
            output = scheduler.step(noise, timestep, latents, eta=ETA, generator=generator)
            latents = output.prev_sample
    images = pipe.vae.decode(output.pred_original_sample / pipe.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


def test_x0_prediction_and_its_gradient_match_diffusers_at_the_drawn_step():
    pipe = _lora_pipe()
    ours, grad_modes = _refl_images(pipe, gradient_step=3)
    assert grad_modes == [False, False, False, True]  # three steps without gradient, the fourth with, no more
    ours.mean().backward()
    our_grads = _lora_grads(pipe)
    reference = _reference_images(pipe, gradient_step=3)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    reference.mean().backward()
    reference_grads = _lora_grads(pipe)
    assert our_grads.keys() == reference_grads.keys() and len(our_grads) > 0
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], reference_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    earlier, _ = _refl_images(pipe, gradient_step=2)  # the check is sensitive to the step
    assert not torch.allclose(earlier, ours, atol=1e-4)


def test_gradient_step_is_drawn_in_the_window_reproducibly():
    config = load_config(
        None,
        [
            "method=refl",
            "model=tiny-random",
            "reward=aesthetic",
            "refl.first_step=2",
            "refl.last_step=5",
            "eval.prompt_sets=[]",
            "eval.rewards=[]",
        ],
    )
    method = ReFL(None, config)
    draws = [method.window(torch.Generator().manual_seed(s)).steps for s in range(40)]
    assert set(draws) == {2, 3, 4, 5}
    assert draws == [method.window(torch.Generator().manual_seed(s)).steps for s in range(40)]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["reward=shapes-oracle"],
            "refl backpropagates through the reward, but 'shapes-oracle' is not differentiable",
        ),
        (["refl.last_step=20"], r"window of denoising steps 0..19 \(sample.num_steps=20\), got 15..20"),
        (["refl.first_step=6", "refl.last_step=4"], r"got 6..4"),
        (["refl.reward_scale=0"], "refl.reward_scale must be positive"),
    ],
)
def test_bad_refl_settings_are_rejected_before_training(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["method=refl", *overrides])
