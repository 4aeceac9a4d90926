"""Rectified-flow models: the SDE sampler against diffusers and against independent math, LoRA on the
transformer in diffusers' format, and every online method on a Stable Diffusion 3 pipeline."""

import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors import safe_open

from diffalign import families, pipeline
from diffalign.config import load_config
from diffalign.flow import flow_sde_step_with_logprob, flow_sde_transition
from diffalign.sampling import sample
from diffalign.train import train

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture()
def flow_pipe():
    return pipeline.load("tiny-random-flow")


def _initial(pipe, batch, seed=0):
    return families.of(pipe).initial_latents(pipe, batch, torch.Generator().manual_seed(seed))


def test_a_flow_pipeline_loads_with_its_flow_scheduler_and_family(flow_pipe, tmp_path):
    assert isinstance(flow_pipe, StableDiffusion3Pipeline)
    assert isinstance(flow_pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert families.of(flow_pipe).denoiser_name == "transformer"
    flow_pipe.save_pretrained(tmp_path / "saved")
    loaded = pipeline.load(str(tmp_path / "saved"))  # a folder: model_index.json names the class
    assert isinstance(loaded, StableDiffusion3Pipeline)


@pytest.mark.parametrize("steps", [1, 4, 7])
def test_zero_noise_reproduces_the_stock_pipeline(flow_pipe, steps):
    latents = _initial(flow_pipe, 2)
    ours = sample(flow_pipe, PROMPTS, num_steps=steps, guidance_scale=4.0, eta=0.0, latents=latents)
    theirs = flow_pipe(
        PROMPTS,
        latents=latents,
        num_inference_steps=steps,
        guidance_scale=4.0,
        output_type="latent",
        max_sequence_length=4,
    ).images
    assert torch.allclose(ours.latents[:, -1], theirs, atol=1e-6)
    assert torch.equal(ours.log_probs, torch.zeros(2, steps))


def test_zero_noise_step_is_the_schedulers_euler_step():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    generator = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    for step, timestep in enumerate(scheduler.timesteps):
        ours, log_prob = flow_sde_step_with_logprob(scheduler, v, step, x, noise_level=0.0)
        theirs = scheduler.step(v, timestep, x).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-6)
        assert log_prob.abs().max() == 0


def test_log_probs_match_an_independent_gaussian():
    """The step written from x̂0 and ε̂ (not the module's algebra) and scored by torch.distributions."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    generator = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    a = 0.7
    sigmas = scheduler.sigmas.tolist()
    for step in range(6):
        s, s_next = sigmas[step], sigmas[step + 1]
        capped = sigmas[1] if s >= 1 else s
        g2 = a * a * capped / (1 - capped)
        eps_hat = x + (1 - s) * v  # E[ε | x_s]
        mean = x + (s_next - s) * v - (s - s_next) * g2 / (2 * s) * eps_hat
        std = math.sqrt(g2 * (s - s_next))
        step_index = torch.full((4,), step)
        sampled, log_prob = flow_sde_step_with_logprob(
            scheduler, v, step_index, x, a, generator=torch.Generator().manual_seed(step)
        )
        expected = torch.distributions.Normal(mean, std).log_prob(sampled).mean(dim=(1, 2, 3))
        assert torch.allclose(log_prob, expected, atol=1e-4)
        _, rescored = flow_sde_step_with_logprob(scheduler, v, step_index, x, a, prev_sample=sampled)
        assert torch.allclose(rescored, log_prob)
        # The sample is the Gaussian's: its standardised residual has unit variance.
        assert ((sampled - mean) / std).std().item() == pytest.approx(1.0, abs=0.1)


def test_the_sde_keeps_the_flows_marginals():
    """With the exact velocity of Gaussian data N(0, c²), the SDE (any noise level) ends at variance c²."""
    c = 0.5
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(400)
    generator = torch.Generator().manual_seed(0)
    for noise_level in (0.0, 0.5, 1.0):
        x = torch.randn(20000, 1, generator=generator)
        for step in range(400):
            s = scheduler.sigmas[step].item()
            variance = (1 - s) ** 2 * c**2 + s**2
            velocity = x * (s - (1 - s) * c**2) / variance  # E[ε − x0 | x_s = x]
            x, _ = flow_sde_step_with_logprob(scheduler, velocity, step, x, noise_level, generator=generator)
        assert x.var().item() == pytest.approx(c**2, rel=0.06), noise_level
    # ...and a wrong sign of the correction term would not: the test can fail.
    x = torch.randn(20000, 1, generator=generator)
    for step in range(400):
        s = scheduler.sigmas[step].item()
        velocity = x * (s - (1 - s) * c**2) / ((1 - s) ** 2 * c**2 + s**2)
        mean, std = flow_sde_transition(scheduler, velocity, step, x, 1.0)
        wrong = mean + 2 * (
            x - (s - scheduler.sigmas[step + 1].item()) * velocity - mean
        )  # flipped correction
        x = wrong + std * torch.randn(x.shape, generator=generator)
    assert abs(x.var().item() - c**2) > 0.2 * c**2


def test_lora_on_the_transformer_saves_in_diffusers_format(flow_pipe, tmp_path):
    pipeline.add_lora(flow_pipe, rank=4, alpha=8, init="gaussian")
    transformer = flow_pipe.transformer
    adapted = {name for name, _ in transformer.named_parameters() if "lora_A" in name}
    assert any("add_q_proj" in name for name in adapted) and any("attn.to_q" in name for name in adapted)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    latents = _initial(flow_pipe, 2)
    trained = sample(flow_pipe, PROMPTS, num_steps=3, eta=0.0, latents=latents).latents[:, -1]
    pipeline.save_lora(transformer, tmp_path / "lora")
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.lora_alpha"] == 8  # alpha travels with the weights
    plain = pipeline.load("tiny-random-flow")  # the same seed: the same base weights
    plain.load_lora_weights(tmp_path / "lora")  # any diffusers program
    loaded = sample(plain, PROMPTS, num_steps=3, eta=0.0, latents=latents).latents[:, -1]
    assert torch.allclose(loaded, trained, atol=1e-5)
    resumed = pipeline.load("tiny-random-flow")
    pipeline.add_lora(resumed, rank=4, alpha=8)
    pipeline.load_lora_into_adapter(resumed.transformer, tmp_path / "lora")
    again = sample(resumed, PROMPTS, num_steps=3, eta=0.0, latents=latents).latents[:, -1]
    assert torch.allclose(again, trained, atol=1e-6)


FLOW_JOB = [
    "model=tiny-random-flow",
    "reward=jpeg-compressibility",
    "prompts=simple-animals",
    "exploration=none",
    "eval.prompt_sets=[simple-animals]",
    "eval.rewards=[]",
    "eval.size=4",
    "sample.num_steps=4",
    "sample.eta=0.7",
    "sample.batch_size=4",
    "sample.num_batches_per_epoch=1",
    "sample.stochastic_steps=[]",
    "train.batch_size=2",
    "tensorboard=false",
]


@pytest.mark.parametrize(
    "method",
    [
        ["method=grpo", "sample.images_per_prompt=2", "grpo.kl_weight=0.04", "eval.num_steps=6"],
        ["method=ddpo"],
        ["method=dpok", "dpok.updates_per_epoch=2"],
        ["method=alignprop", "reward=shapes-clip"],
        ["method=refl", "reward=shapes-clip", "refl.first_step=1", "refl.last_step=2"],
    ],
    ids=["grpo", "ddpo", "dpok", "alignprop", "refl"],
)
def test_online_methods_train_a_flow_model_end_to_end(method, tmp_path):
    config = load_config(None, [*FLOW_JOB, *method, "epochs=2", f"output_dir={tmp_path / 'run'}"])
    result = train(config, progress=False)
    assert [record["epoch"] for record in result.history] == [0, 1, 2]
    assert all(math.isfinite(record["loss"]) for record in result.history[1:])
    weights = result.lora_dir / "pytorch_lora_weights.safetensors"
    assert weights.is_file()
    state, _ = StableDiffusion3Pipeline.lora_state_dict(str(result.lora_dir), return_lora_metadata=True)
    assert all(key.startswith("transformer.") for key in state)
    assert (tmp_path / "run" / "samples" / "epoch-0002.png").is_file()


def test_a_resumed_flow_run_matches_an_uninterrupted_one(tmp_path):
    job = [*FLOW_JOB, "method=grpo", "sample.images_per_prompt=2"]
    whole = train(load_config(None, [*job, "epochs=2", f"output_dir={tmp_path / 'whole'}"]), progress=False)
    train(load_config(None, [*job, "epochs=1", f"output_dir={tmp_path / 'split'}"]), progress=False)
    resumed = train(
        load_config(None, [*job, "epochs=2", f"output_dir={tmp_path / 'split'}"]), resume=True, progress=False
    )
    for key in ("reward_mean", "loss"):
        assert resumed.history[-1][key] == pytest.approx(whole.history[-1][key], rel=1e-5), key


def test_what_a_flow_model_cannot_do_is_refused_with_the_reason(tmp_path):
    from diffalign.errors import DiffalignError

    with pytest.raises(DiffalignError, match="compel"):
        train(
            load_config(
                None, [*FLOW_JOB, "method=ddpo", "exploration=diffexp", f"output_dir={tmp_path / 'x'}"]
            ),
            progress=False,
        )
