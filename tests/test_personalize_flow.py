"""Personalisation of flow models (DreamBooth-LoRA and MuDI on a Stable Diffusion 3 pipeline): the
flow-matching loss against a hand computation, MuDI's initial noise, a short run whose LoRA plain
diffusers loads, learning, exact resumption, and the marked VAE for shapes-flow."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file
from test_mudi import disc_subject, square_subject
from test_personalize import TINY, _pair, _subjects, _update, _write_subject

from diffalign import families, mudi, pipeline
from diffalign.optim.dpo import encode_images
from diffalign.personalize import Example, Personalizer, chosen_vae, load_personalize_config, personalize

FLOW = [*(override for override in TINY if not override.startswith("model=")), "model=tiny-random-flow"]


def _config(tmp_path, name, subjects, *extra):
    return load_personalize_config(None, [*FLOW, subjects, f"output_dir={tmp_path / name}", *extra])


def test_dreambooth_loss_on_a_flow_model_is_the_velocity_error_at_logit_normal_s(tmp_path, cache):
    folder = _write_subject(tmp_path / "one", (200, 30, 30), count=2)
    run = Personalizer(_config(tmp_path, "run", _subjects(("olis", "toy", folder)), "prior.enabled=false"))
    examples = [Example(image, "a photo of olis toy") for image in run.subjects[0].images]
    with torch.no_grad():
        errors = run.losses(examples, torch.Generator().manual_seed(4))

    # By hand, with the draws in the same order: VAE posterior samples, noise, then s (shift 3).
    pipe = pipeline.load("tiny-random-flow")
    draws = torch.Generator().manual_seed(4)
    latents = encode_images(pipe, [example.image for example in examples], 32, draws)
    noise = torch.randn(latents.shape, generator=draws)
    logistic = torch.sigmoid(torch.randn(2, generator=draws))
    sigma = (3 * logistic / (1 + 2 * logistic)).view(-1, 1, 1, 1)
    cond, _, pooled, _ = pipe.encode_prompt(["a photo of olis toy"] * 2, None, None, max_sequence_length=4)
    with torch.no_grad():
        velocity = pipe.transformer(
            hidden_states=(1 - sigma) * latents + sigma * noise,
            timestep=sigma.flatten() * 1000,
            encoder_hidden_states=cond,
            pooled_projections=pooled,
        ).sample
    expected = ((velocity - (noise - latents)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(errors, expected, rtol=1e-4, atol=1e-6)


def test_mean_shifted_noise_of_a_flow_model():
    pipe = pipeline.load("tiny-random-flow")
    subjects = [disc_subject(), square_subject()]
    plain = families.of(pipe).initial_latents(pipe, 1, torch.Generator().manual_seed(3))
    zero = mudi.mean_shifted_latents(pipe, subjects, gamma=0.0, generator=torch.Generator().manual_seed(3))
    assert zero.shape == (1, 4, 16, 16) and torch.equal(zero, plain)  # x_1 is the unit Gaussian
    shifted = mudi.mean_shifted_latents(pipe, subjects, gamma=1.0, generator=torch.Generator().manual_seed(3))
    shift = shifted - plain
    assert shift.abs().max() > 0 and shift.mean(dim=(2, 3)).abs().max() < 1e-4  # centred per channel


def test_short_mudi_run_on_a_flow_model_writes_a_lora_diffusers_loads(tmp_path, cache):
    config = _config(
        tmp_path, "run", _pair(None, tmp_path), "mode=segmix", "eval.mean_shift=0.1", "eval.dnc_scorer=''"
    )
    result = personalize(config, progress=False)
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2]
    assert all(np.isfinite(record["loss"]) for record in records)
    assert sorted(path.name for path in (out / "samples").iterdir()) == ["step-0000.png", "step-0002.png"]
    saved = load_file(str(result.lora_dir / "pytorch_lora_weights.safetensors"))
    assert saved and all(key.startswith("transformer.") for key in saved)
    pipe = pipeline.load("tiny-random-flow")
    assert isinstance(pipe, StableDiffusion3Pipeline)
    latents = families.of(pipe).initial_latents(pipe, 1, torch.Generator().manual_seed(0))
    kwargs = {"num_inference_steps": 2, "latents": latents, "output_type": "pt", "max_sequence_length": 4}
    base = pipe(["a photo of olis toy"], **kwargs).images
    pipe.load_lora_weights(str(result.lora_dir))  # plain diffusers reads it
    tuned = pipe(["a photo of olis toy"], **kwargs).images
    assert not torch.allclose(base, tuned)


def test_flow_loss_goes_down_when_overfitting_one_image(tmp_path, cache):
    folder = _write_subject(tmp_path / "one", (200, 30, 30), count=1)
    config = _config(
        tmp_path, "run", _subjects(("olis", "toy", folder)), "prior.enabled=false", "steps=80",
        "save_every=80", "eval.every=80", "lora.rank=8", "learning_rate=1e-2",
        # The tiny transformer's attention alone fits an image slowly: its feed-forwards train too.
        "lora.target_modules=[attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, ff.net.0.proj, ff.net.2, proj_out]",
    )  # fmt: skip
    run = Personalizer(config)
    fixed = [Example(run.subjects[0].images[0], "a photo of olis toy")] * 8

    def fixed_loss():
        with torch.no_grad():
            return run.losses(fixed, torch.Generator().manual_seed(123)).mean().item()

    first = fixed_loss()
    for _ in range(80):
        _update(run)
    assert fixed_loss() < 0.5 * first


def test_a_resumed_flow_run_matches_an_uninterrupted_one(tmp_path, cache):
    subjects = _pair(None, tmp_path)
    full = personalize(_config(tmp_path, "full", subjects, "steps=4"), progress=False)
    personalize(_config(tmp_path, "cut", subjects, "steps=2"), progress=False)
    resumed = personalize(_config(tmp_path, "cut", subjects, "steps=4"), resume=True, progress=False)
    for ours, reference in zip(resumed.history, full.history):
        for key in ("loss", "instance_loss", "prior_loss"):
            assert ours[key] == pytest.approx(reference[key], rel=1e-6), key


def test_shapes_flow_draws_subjects_with_the_marked_vae():
    config = load_personalize_config(None, ["model=shapes-flow", "subject_set=shapes-similar-1"])
    assert chosen_vae(config) == "shapes-vae-marked"  # the same latent space as the flow model's VAE
    pipe = pipeline.load("shapes-flow")
    vae = pipeline.swap_vae(pipe, "shapes-vae-marked", "shapes-flow")
    assert pipe.vae is vae
