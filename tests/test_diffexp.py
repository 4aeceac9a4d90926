"""DiffExp exploration: reproducible schedules and weights, compel embeddings, exact replay."""

import pytest
import torch
from accelerate import Accelerator
from compel import Compel

from diffalign import pipeline, rewards
from diffalign.config import ConfigError, DiffExpSection, load_config
from diffalign.diffexp import DiffExp, ExplorationError, content_words, guidance_schedule
from diffalign.optim.base import TrainContext, collect_rollouts
from diffalign.sampling import ddim_step_with_logprob, encode_prompts, guided_noise, sample


def _diffexp(pipe, **changes) -> DiffExp:
    return DiffExp(pipe, DiffExpSection(**changes), guidance_scale=5.0, num_steps=10)


def test_guidance_schedule_is_low_early_high_late_and_reproducible():
    section = DiffExpSection(low_guidance=[1.0, 2.0], low_guidance_fraction=0.3)
    first = guidance_schedule(section, 7.5, 6, 10, torch.Generator().manual_seed(3))
    again = guidance_schedule(section, 7.5, 6, 10, torch.Generator().manual_seed(3))
    other = guidance_schedule(section, 7.5, 6, 10, torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert ((first[:, :3] >= 1.0) & (first[:, :3] <= 2.0)).all()
    assert (first[:, 3:] == 7.5).all()
    assert len(set(first[:, 0].tolist())) == 6  # one low scale per sample
    assert (guidance_schedule(DiffExpSection(cfg_schedule=False), 7.5, 2, 10, torch.Generator()) == 7.5).all()


def test_phrase_weighting_is_reproducible_and_weights_only_content_words(tiny_pipe):
    explorer = _diffexp(tiny_pipe, phrase_weight=[1.2, 1.4])
    prompt = "a red circle left of a blue square"
    assert [prompt[a:b] for a, b in content_words(prompt)] == ["red", "circle", "blue", "square"]
    drawn = [explorer.weight_phrases(prompt, torch.Generator().manual_seed(s)) for s in range(8)]
    assert drawn == [explorer.weight_phrases(prompt, torch.Generator().manual_seed(s)) for s in range(8)]
    assert len(set(drawn)) > 1
    for weighted in drawn:
        fragments = Compel.parse_prompt_string(weighted).prompts[0].children
        assert " ".join(f.text for f in fragments) == prompt
        emphasised = [f for f in fragments if f.weight != 1.0]
        assert len(emphasised) == 1 and emphasised[0].text in {"red", "circle", "blue", "square"}
        assert 1.2 <= emphasised[0].weight <= 1.4


def test_compel_embeddings_of_an_unweighted_prompt_equal_the_pipeline_encoder(tiny_pipe):
    explorer = _diffexp(tiny_pipe)
    prompts = ["a cat riding a bike", "two red circles"]
    ours = explorer.compel(prompts)
    reference, _ = encode_prompts(tiny_pipe, prompts)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_exploration_changes_the_samples(tiny_pipe):
    explorer = _diffexp(tiny_pipe)
    prompts = ["a red circle", "a blue square"]
    explored = explorer.explore(prompts, torch.Generator().manual_seed(0))
    plain = sample(
        tiny_pipe,
        prompts,
        num_steps=10,
        guidance_scale=5.0,
        eta=1.0,
        generator=torch.Generator().manual_seed(1),
    )
    varied = sample(
        tiny_pipe,
        prompts,
        num_steps=10,
        guidance_scale=explored.guidance_scales,
        eta=1.0,
        generator=torch.Generator().manual_seed(1),
        prompt_embeds=explored.prompt_embeds,
    )
    assert (plain.images - varied.images).abs().max() > 1e-3
    assert torch.equal(varied.guidance_scales, explored.guidance_scales.to(varied.guidance_scales))


def test_importance_ratio_is_exactly_one_with_diffexp_on():
    pipe = pipeline.load("tiny-random")
    pipeline.add_lora(pipe)
    explorer = DiffExp(pipe, DiffExpSection(), guidance_scale=5.0, num_steps=5)
    context = TrainContext(
        pipe,
        pipe.unet,
        None,
        Accelerator(),
        rewards.build("jpeg-compressibility"),
        ["a cat", "a dog fetching a ball"],
        [],
        explorer,
    )
    trajectory, _ = collect_rollouts(
        context,
        batch_size=4,
        num_batches=1,
        images_per_prompt=2,
        shared_initial_noise=True,
        num_steps=5,
        guidance_scale=5.0,
        eta=1.0,
        negative_prompt="",
        generator=torch.Generator().manual_seed(0),
    )
    assert not torch.equal(trajectory.guidance_scales[:, 0], torch.full((4,), 5.0))
    pipe.unet.train()
    for step in range(5):
        noise = guided_noise(
            pipe.unet,
            trajectory.latents[:, step],
            trajectory.timesteps[step],
            trajectory.prompt_embeds,
            trajectory.negative_prompt_embeds,
            trajectory.guidance_scales[:, step],
        )
        _, log_prob = ddim_step_with_logprob(
            pipe.scheduler,
            noise,
            trajectory.timesteps[step],
            trajectory.latents[:, step],
            eta=1.0,
            prev_sample=trajectory.latents[:, step + 1],
        )
        assert torch.equal(torch.exp(log_prob - trajectory.log_probs[:, step]), torch.ones(4))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("diffexp.low_guidance=[3.0, 1.0]", "low_guidance is empty"),
        ("diffexp.phrase_weight=[-0.5, 1.0]", "must not be negative"),
        ("diffexp.phrase_weight=[1.0]", "pair of numbers"),
        ("exploration=diffexpp", "Did you mean 'diffexp'"),
    ],
)
def test_bad_diffexp_settings_are_rejected_before_training(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["exploration=diffexp", override])


def test_prompts_with_compel_syntax_are_refused(tiny_pipe):
    explorer = _diffexp(tiny_pipe)
    with pytest.raises(ExplorationError, match="compel syntax"):
        explorer.check_prompts(["a cat", "a (red++ circle"])
    with pytest.raises(ExplorationError, match="no content word"):
        explorer.check_prompts(["a of the"])
