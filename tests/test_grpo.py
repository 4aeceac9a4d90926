"""GRPO's group-relative advantages and KL, LoRA initialisations, and the step-by-step Trainer API."""

import json
import warnings

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from diffalign import pipeline, rewards
from diffalign.config import load_config
from diffalign.optim.base import TrainContext
from diffalign.optim.dpok import adapter_disabled
from diffalign.optim.grpo import GRPO, group_advantages
from diffalign.sampling import ddim_posterior, guided_noise
from diffalign.train import Trainer, train

TINY = [
    "method=ddpo",
    "model=tiny-random",
    "reward=jpeg-compressibility",
    "prompts=simple-animals",
    "eval.prompt_sets=[]",
    "eval.rewards=[]",
    "eval.size=4",
    "sample.num_steps=3",
    "sample.batch_size=4",
    "sample.num_batches_per_epoch=1",
    "train.batch_size=2",
    "tensorboard=false",
    "sample.stochastic_steps=[]",
]  # the grpo preset's window is for 20 steps


def test_group_advantages_match_an_independent_computation():
    rewards_ = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 4.5])
    groups = rewards_.numpy().reshape(2, 4)
    expected = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, keepdims=True) + 1e-6)
    assert np.allclose(group_advantages(rewards_, 4).numpy(), expected.reshape(-1), atol=1e-6)
    by_batch = (groups - groups.mean(1, keepdims=True)) / (rewards_.numpy().std() + 1e-6)
    assert np.allclose(group_advantages(rewards_, 4, std="batch").numpy(), by_batch.reshape(-1), atol=1e-6)
    assert group_advantages(torch.ones(4), 2).abs().max() == 0  # a group that scored alike teaches nothing


def test_grpo_needs_groups_and_lora_for_its_kl():
    with pytest.raises(ValueError, match="images_per_prompt must be at least 2"):
        load_config(None, [*TINY, "method=grpo", "sample.images_per_prompt=1"])
    with pytest.raises(ValueError, match="lora.enabled=true"):
        load_config(
            None,
            [*TINY, "method=grpo", "grpo.kl_weight=0.1", "lora.enabled=false", "sample.images_per_prompt=2"],
        )


def test_grpo_kl_is_zero_at_init_and_the_gaussian_kl_after_a_change():
    config = load_config(None, [*TINY, "method=grpo", "grpo.kl_weight=0.5", "sample.images_per_prompt=2"])
    pipe = pipeline.load("tiny-random")
    pipeline.add_lora(pipe)
    context = TrainContext(
        pipe, pipe.unet, None, Accelerator(cpu=True), rewards.build("jpeg-compressibility"), ["a cat"], []
    )
    method = GRPO(context, config)
    from diffalign.sampling import sample

    trajectory = sample(pipe, ["a cat", "a cat"], num_steps=3, generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(3)
    rows, step = torch.arange(2), torch.tensor([1, 1])
    args = (
        trajectory.latents[rows, step],
        trajectory.timesteps[step],
        trajectory.prompt_embeds,
        trajectory.negative_prompt_embeds,
        trajectory.guidance_scales[rows, step],
    )
    noise = guided_noise(pipe.unet, *args)
    assert method.regulariser(trajectory, rows, step, noise)["kl_to_reference"].item() == 0.0
    with torch.no_grad():  # move the adapter's up-projections off zero
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    noise = guided_noise(pipe.unet, *args)
    with adapter_disabled(pipe.unet):
        reference = guided_noise(pipe.unet, *args)
    mean, std = ddim_posterior(pipe.scheduler, noise, args[1], args[0], 1.0)
    reference_mean, _ = ddim_posterior(pipe.scheduler, reference, args[1], args[0], 1.0)
    expected = 0.5 * ((mean - reference_mean) ** 2 / (2 * std**2)).mean()
    got = method.regulariser(trajectory, rows, step, noise)["kl_to_reference"]
    assert got.item() > 0 and got.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(("init", "expected_std"), [("gaussian", 1 / 4), ("default", None)])
def test_lora_inits_start_from_the_base_model(init, expected_std):
    pipe = pipeline.load("tiny-random")
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    before = pipe.unet(latents, 10, encoder_hidden_states=text).sample
    pipeline.add_lora(pipe, rank=4, init=init)
    down = torch.cat([p.flatten() for n, p in pipe.unet.named_parameters() if "lora_A" in n])
    up = torch.cat([p.flatten() for n, p in pipe.unet.named_parameters() if "lora_B" in n])
    assert up.abs().max() == 0
    assert torch.equal(pipe.unet(latents, 10, encoder_hidden_states=text).sample, before)
    if expected_std is not None:
        assert down.std().item() == pytest.approx(expected_std, rel=0.05)
    else:  # peft's Kaiming-uniform: bound sqrt(6 / ((1 + 5) fan_in)) = 1/sqrt(fan_in), several times smaller
        assert down.std().item() < 0.6 / 4


def test_an_inert_clip_is_said():
    with pytest.warns(UserWarning, match="plain REINFORCE"):
        load_config(None, [*TINY, "train.gradient_accumulation_steps=2"])  # 2 x 2 = the epoch's 4 samples
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, [*TINY, "train.gradient_accumulation_steps=2", "train.inner_epochs=2"])
        load_config(None, TINY)


def test_the_trainer_api_drives_the_same_run_as_train(tmp_path):
    reference = train(load_config(None, [*TINY, "epochs=2", f"output_dir={tmp_path / 'a'}"]), progress=False)
    trainer = Trainer(load_config(None, [*TINY, "epochs=2", f"output_dir={tmp_path / 'b'}"]))
    trainer.evaluate()
    records = [trainer.run_epoch(), trainer.run_epoch()]
    result = trainer.finish()
    for ours, theirs in zip(records, reference.history[1:]):
        assert ours["sampling_seconds"] > 0 and ours["training_seconds"] > 0
        assert ours["sampling_seconds"] + ours["training_seconds"] == pytest.approx(ours["seconds"])
        for key in ("reward_mean", "loss", "approx_kl", "samples_seen"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), key
    lines = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1, 2]


def test_per_image_scores_without_a_grid(tmp_path):
    trainer = Trainer(load_config(None, [*TINY, "epochs=1", f"output_dir={tmp_path / 'run'}"]))
    scores = trainer.evaluator.scores(trainer.pipe, trainer.accelerator)
    values = scores["simple-animals"]["jpeg-compressibility"]
    assert values.shape == (4,)
    assert not (tmp_path / "run" / "samples").exists()
    means = trainer.evaluate()
    assert means["eval/simple-animals/jpeg-compressibility"] == pytest.approx(values.mean().item(), rel=1e-6)
