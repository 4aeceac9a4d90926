"""MixGRPO's window (``sample.stochastic_steps``): only the window's steps are stochastic and trained."""

import pytest
import torch

from diffalign import pipeline
from diffalign.config import ConfigError, load_config
from diffalign.optim.ddpo import trainable_steps, trained_steps
from diffalign.sampling import encode_prompts, guided_noise, initial_latents, sample
from diffalign.train import Trainer

PROMPTS = ["a cat", "a dog"]
TINY = [
    "method=ddpo",
    "model=tiny-random",
    "reward=jpeg-compressibility",
    "prompts=simple-animals",
    "eval.prompt_sets=[]",
    "eval.rewards=[]",
    "eval.size=4",
    "sample.num_steps=6",
    "sample.batch_size=4",
    "sample.num_batches_per_epoch=1",
    "train.batch_size=2",
    "tensorboard=false",
]


def test_only_the_window_is_stochastic_and_it_matches_diffusers_step_by_step():
    pipe = pipeline.load("tiny-random")
    ours = sample(
        pipe,
        PROMPTS,
        num_steps=6,
        eta=1.0,
        generator=torch.Generator().manual_seed(0),
        stochastic_steps=(2, 3),
    )
    assert (ours.log_probs[:, [0, 1, 4, 5]] == 0).all() and (ours.log_probs[:, 2:4] != 0).all()
    # diffusers' DDIMScheduler.step with eta 1 inside the window and 0 outside, same generator
    generator = torch.Generator().manual_seed(0)
    cond, uncond = encode_prompts(pipe, PROMPTS)
    pipe.scheduler.set_timesteps(6)
    latents = initial_latents(pipe, 2, generator)
    with torch.no_grad():
        for step, timestep in enumerate(pipe.scheduler.timesteps):
            noise = guided_noise(pipe.unet, latents, timestep, cond, uncond, torch.full((2,), 5.0))
            latents = pipe.scheduler.step(
                noise, timestep, latents, eta=1.0 if 2 <= step <= 3 else 0.0, generator=generator
            ).prev_sample
            torch.testing.assert_close(ours.latents[:, step + 1], latents, rtol=1e-4, atol=1e-5)
    everywhere = sample(pipe, PROMPTS, num_steps=6, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(everywhere.latents[:, -1], ours.latents[:, -1], atol=1e-3)


def test_ddpo_trains_only_the_window_steps(tmp_path):
    config = load_config(
        None,
        [
            *TINY,
            "epochs=1",
            "sample.stochastic_steps=[1, 3]",
            "train.timestep_fraction=1.0",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    assert trainable_steps(config) == [1, 2, 3] and trained_steps(config) == 3
    trainer = Trainer(config)
    seen: list[int] = []
    hook = trainer.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.extend(args[1].tolist()) if torch.is_grad_enabled() else None,
        with_kwargs=True,
    )
    record = trainer.run_epoch()
    hook.remove()
    timesteps = trainer.pipe.scheduler.timesteps.tolist()  # the training sampler's 6
    trainer.finish()
    assert set(seen) == {timesteps[1], timesteps[2], timesteps[3]}  # the window, every step of it
    assert record["samples_seen"] == 4


def test_without_a_window_every_step_is_trainable():
    config = load_config(None, [*TINY, "train.timestep_fraction=0.5"])
    assert trainable_steps(config) == list(range(6)) and trained_steps(config) == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sample.stochastic_steps=[2, 6]"], r"0 <= first <= last < sample.num_steps \(6\), got \[2, 6\]"),
        (["sample.stochastic_steps=[3, 1]"], r"got \[3, 1\]"),
        (["sample.stochastic_steps=[3]"], r"got \[3\]"),
        (["method=dpok", "sample.stochastic_steps=[0, 3]"], "dpok does not use it"),
    ],
)
def test_bad_windows_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, *overrides])
