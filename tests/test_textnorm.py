"""TextNorm (Kim et al. 2024) and its contrastive-prompt generators, on the shipped ShapesWorld
CLIP and tiny seeded models of the real classes (no downloads)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffalign.rewards import TINY_RANDOM, ContrastError, RewardError, TextNorm, TextNormError
from diffalign.rewards.base import TextEmbeddingCache
from diffalign.rewards.contrast import (
    FEW_SHOT,
    FileContrast,
    LanguageModelContrast,
    RuleContrast,
    from_spec,
    parse_lines,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from diffalign import rewards
from diffalign.config import ConfigError, load_config
from diffalign.shapes import grammar, splits
from diffalign.shapes.contrast import ShapesContrast
from diffalign.shapes.world import render

PROMPTS = ["a red circle", "two red circles", "a red circle left of a blue square"]  # 9, 9 and 21 contrasts


def rendered(prompts: list[str], seed: int = 0) -> torch.Tensor:
    """A correct ShapesWorld image of each prompt, ``[B, 3, 32, 32]`` in [0, 1]."""
    rng = np.random.default_rng(seed)
    arrays = [render(grammar.scene_for(prompt, rng), 32) for prompt in prompts]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


class PromptByPrompt:
    """A reward without ``score_candidates``, so TextNorm takes its fallback path."""

    def __init__(self, reward):
        self.reward, self.name, self.differentiable = reward, reward.name, reward.differentiable

    def __call__(self, images, prompts):
        return self.reward(images, prompts)


@pytest.fixture(scope="module")
def clip() -> rewards.Reward:
    return rewards.build("shapes-clip")


@pytest.fixture(scope="module")
def tiny() -> dict[str, rewards.Reward]:
    names = ("clip-score", "hpsv2", "pickscore")
    return {name: rewards.build(name, checkpoint=TINY_RANDOM) for name in names}


def hand_probability(reward, image: torch.Tensor, prompt: str, c: float) -> float:
    """exp(c R(x, y)) / sum exp(c R(x, y')) with every score from its own call, in float64."""
    candidates = [prompt, *ShapesContrast()(prompt)]
    with torch.no_grad():
        scores = [reward(image[None], [candidate]).double().item() for candidate in candidates]
    weights = [math.exp(c * (score - max(scores))) for score in scores]
    return weights[0] / sum(weights)


# --- the calibrated reward -----------------------------------------------------------------------


def test_probability_is_the_softmax_over_the_prompt_and_its_contrasts(clip):
    images = rendered(PROMPTS)
    with torch.no_grad():
        scores = rewards.checked_call(TextNorm(clip, c=20.0), images, PROMPTS)
    expected = [hand_probability(clip, image, prompt, 20.0) for image, prompt in zip(images, PROMPTS)]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-4)
    assert ((scores > 0) & (scores < 1)).all()


def test_small_c_gives_every_candidate_the_same_probability(clip):
    with torch.no_grad():
        scores = TextNorm(clip, c=1e-6)(rendered(PROMPTS), PROMPTS)
    sizes = torch.tensor([1 + len(ShapesContrast()(prompt)) for prompt in PROMPTS], dtype=torch.float32)
    torch.testing.assert_close(scores, 1 / sizes, atol=1e-6, rtol=1e-4)


def test_an_image_scores_higher_for_its_own_prompt_than_for_a_contrast(clip):
    image = rendered(["two red circles"])
    textnorm = TextNorm(clip)
    with torch.no_grad():
        true = textnorm(image, ["two red circles"]).item()
        others = ("three red circles", "two blue circles", "a red circle")
        contrasts = [textnorm(image, [prompt]).item() for prompt in others]
    assert true > 0.5 and all(true > score for score in contrasts), (true, contrasts)


def test_ensemble_is_the_mean_probability_minus_the_weighted_variance(clip, tiny):
    members, scales, weight = [clip, tiny["clip-score"]], [20.0, 100.0], 0.5
    images = rendered(PROMPTS)
    with torch.no_grad():
        scores = TextNorm(members, c=scales, uncertainty_weight=weight)(images, PROMPTS)
    for image, prompt, score in zip(images, PROMPTS, scores):
        p = [hand_probability(m, image, prompt, c) for m, c in zip(members, scales)]
        mean = sum(p) / 2
        variance = sum((q - mean) ** 2 for q in p) / 2
        assert score.item() == pytest.approx(mean - weight * variance, abs=1e-5)


@pytest.mark.parametrize("path", ["candidates", "fallback"])
def test_gradients_reach_the_images(clip, tiny, path):
    members = [clip, tiny["clip-score"]]
    if path == "fallback":
        members = [PromptByPrompt(m) for m in members]
    textnorm = TextNorm(members, c=[20.0, 100.0])
    assert textnorm.differentiable
    images = rendered(PROMPTS).requires_grad_(True)
    textnorm(images, PROMPTS).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(images.grad[b].abs().sum() > 0 for b in range(len(PROMPTS)))


@pytest.mark.parametrize("name", ["shapes-clip", "clip-score", "hpsv2", "pickscore"])
def test_candidate_fast_path_equals_scoring_prompt_by_prompt(name, clip, tiny):
    reward = clip if name == "shapes-clip" else tiny[name]
    images = rendered(PROMPTS)
    fast, slow = TextNorm(reward, c=20.0), TextNorm(PromptByPrompt(reward), c=20.0)
    with torch.no_grad():
        torch.testing.assert_close(fast(images, PROMPTS), slow(images, PROMPTS), atol=1e-5, rtol=1e-4)
        rows = [["a red circle", "a blue square"], ["two red circles", "a red circle"], ["a cyan star", "x"]]
        expected = torch.stack([reward(images, [row[k] for row in rows]) for k in range(2)], dim=1)
        torch.testing.assert_close(reward.score_candidates(images, rows), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(RewardError, match="one row of candidate prompts per image"):
        reward.score_candidates(images, rows[:2])


def test_contrasts_are_generated_once_per_prompt(clip):
    calls: list[str] = []

    def counting(prompt: str) -> list[str]:
        calls.append(prompt)
        return ShapesContrast()(prompt)

    textnorm = TextNorm(clip, contrast=counting)
    with torch.no_grad():
        for _ in range(3):
            textnorm(rendered(PROMPTS), PROMPTS)
    assert calls == PROMPTS


def test_text_embedding_cache_embeds_each_new_prompt_once_and_stays_bounded():
    batches: list[list[str]] = []

    def embed(prompts: list[str]) -> torch.Tensor:
        batches.append(prompts)
        return torch.tensor([[float(len(p))] for p in prompts])

    cache = TextEmbeddingCache(embed, max_size=3)
    assert cache(["ab", "abc", "ab"], "cpu").flatten().tolist() == [2.0, 3.0, 2.0]
    cache(["abc", "abcd", "a"], "cpu")
    assert batches == [["ab", "abc"], ["abcd", "a"]]  # one batch per call, only unseen prompts
    cache(["ab"], "cpu")  # evicted (least recently used), so embedded again
    assert batches[-1] == ["ab"]


# --- errors that teach ----------------------------------------------------------------------------


def test_an_empty_contrast_set_is_an_error_naming_the_prompt_and_the_fix(clip):
    with pytest.raises(TextNormError, match=r"'a red circle'.*contrast: rules.*contrast file"):
        TextNorm(clip, contrast=lambda prompt: [prompt])(rendered(["a red circle"]), ["a red circle"])
    with pytest.raises(TextNormError, match="'a photo of a cat'.*'rules'"):
        TextNorm(clip, contrast="rules")(rendered(["a red circle"]), ["a photo of a cat"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"c": [20.0, 100.0]}, "c has 2 values for 1 rewards"),
        ({"c": -1.0}, "positive finite"),
        ({"uncertainty_weight": 0.1}, "two or more rewards"),
        ({"contrast": "shape"}, "Did you mean 'shapes'"),
        ({"contrast": "file:"}, "unknown contrast generator"),
    ],
)
def test_bad_options_are_clear_errors(clip, options, message):
    with pytest.raises(RewardError, match=message):
        TextNorm(clip, **options)


def test_rewards_without_a_default_scale_need_c(clip):
    with pytest.raises(TextNormError, match=r"no default scale c for \['jpeg-compressibility'\]"):
        TextNorm([clip, rewards.build("jpeg-compressibility")])
    assert TextNorm([clip, rewards.build("jpeg-compressibility")], c=[20.0, 1.0]).differentiable is False


# --- registry, config, training ---------------------------------------------------------------------


def test_the_registry_builds_wrapped_names_with_member_options():
    single = rewards.build("textnorm(shapes-clip)", c=50, contrast="shapes")
    assert isinstance(single, TextNorm) and single.name == "textnorm(shapes-clip)" and single.scales == [50.0]
    ensemble = rewards.build(
        "textnorm(shapes-clip, clip-score)", c=[20, 100], **{"clip-score": {"checkpoint": TINY_RANDOM}}
    )
    assert ensemble.name == "textnorm(shapes-clip,clip-score)" and len(list(ensemble.member_modules)) == 2
    entry = rewards.info("textnorm(shapes-clip,clip-score)")
    assert entry.differentiable and entry.needs_checkpoint
    assert not rewards.info("textnorm(shapes-clip,shapes-oracle)").differentiable
    assert "textnorm(REWARD,...)" in [entry.name for entry in rewards.available()]
    with pytest.raises(RewardError, match="Did you mean 'shapes-clip'"):
        rewards.info("textnorm(shapes-clp)")
    with pytest.raises(RewardError, match="Did you mean 'textnorm'"):
        rewards.info("textnrom(shapes-clip)")
    with pytest.raises(RewardError, match=r"textnorm\(shapes-clip\)"):
        rewards.info("textnorm")
    with pytest.raises(RewardError, match="must be a mapping"):
        rewards.build("textnorm(clip-score)", **{"clip-score": "tiny-random"})


def test_config_validates_textnorm_and_alignprop_needs_differentiable_members(tmp_path):
    config = load_config(None, ["reward=textnorm(shapes-clip)", "reward_options={c: 50, contrast: shapes}"])
    assert config.reward == "textnorm(shapes-clip)"
    assert config.reward_options == {"c": 50, "contrast": "shapes"}
    with pytest.raises(ConfigError, match="Did you mean 'shapes-clip'"):
        load_config(None, ["reward=textnorm(shapes-clp)"])
    with pytest.raises(ConfigError, match="not differentiable"):
        load_config(None, ["method=alignprop", "reward=textnorm(shapes-clip,shapes-oracle)"])


@pytest.mark.parametrize("method", ["ddpo", "alignprop"])
def test_one_training_epoch_on_textnorm(tmp_path, method):
    from diffalign.train import train

    settings = [
        f"method={method}",
        "model=tiny-random",
        "reward=textnorm(shapes-clip)",
        "reward_options={c: 20, contrast: shapes}",
        "prompts=shapes-single",
        "eval.prompt_sets=[]",
        "eval.rewards=[]",
        "sample.num_steps=2",
        "sample.batch_size=4",
        "sample.num_batches_per_epoch=1",
        "sample.images_per_prompt=2",
        "train.batch_size=4",
        "epochs=1",
        "tensorboard=false",
        f"output_dir={tmp_path / 'run'}",
    ]
    result = train(load_config(None, settings), progress=False)
    record = result.history[-1]
    assert record["samples_seen"] == 4 and 0 < record["reward_mean"] < 1 and math.isfinite(record["loss"])


# --- contrast generators ----------------------------------------------------------------------------


def test_shapes_contrasts_of_every_prompt_are_valid_and_mean_something_else():
    generator = ShapesContrast()
    for prompt in splits.prompts("train") + splits.prompts("heldout"):
        original = grammar.parse(prompt).canonical()
        meanings = [grammar.parse(contrast).canonical() for contrast in generator(prompt)]
        assert meanings and original not in meanings, prompt
        assert len(set(meanings)) == len(meanings), prompt  # each meaning once


def test_shapes_contrasts_cover_every_kind_of_edit():
    relation = ShapesContrast()("a red circle left of a blue square")
    for expected in [
        "a green circle left of a blue square",  # colour
        "a red circle left of a blue triangle",  # shape
        "a blue circle left of a red square",  # colours exchanged
        "a red square left of a blue circle",  # shapes exchanged
        "a blue square left of a red circle",  # subject and object exchanged
        "a red circle above a blue square",  # another relation
        "a blue square",  # an object dropped
    ]:
        assert expected in relation
    assert "a blue square right of a red circle" not in relation  # the same picture
    assert "a red circle right of a blue square" not in relation  # equals the exchange, offered once
    assert ShapesContrast()("two red circles")[:2] == ["a red circle", "three red circles"]
    with pytest.raises(ContrastError, match="'a photo of a cat'.*contrast 'rules'"):
        ShapesContrast()("a photo of a cat")


def test_rule_contrasts_swap_numbers_colours_and_spatial_words():
    contrasts = RuleContrast()("Red car to the left of two blue buses")
    for expected in [
        "Green car to the left of two blue buses",  # colour, capital kept
        "Red car to the right of two blue buses",  # spatial word
        "Red car to the left of three blue buses",  # number
        "Red car to the left of one blue buses",
        "Blue car to the left of two red buses",  # colours exchanged
    ]:
        assert expected in contrasts
    assert len(contrasts) == len(set(contrasts))
    assert "a grey cat" not in RuleContrast()("a gray cat")  # synonyms are not contrasts
    assert RuleContrast()("a photo of a cat") == []


def test_contrast_file_is_looked_up_normalised_and_bad_files_name_the_path(tmp_path):
    path = tmp_path / "contrasts.json"
    contrasts = ["a blue circle", "a blue circle", "a red circle", "two red circles"]
    path.write_text(json.dumps({"A red circle.": contrasts}))
    generator = from_spec(f"file:{path}")
    assert isinstance(generator, FileContrast)
    assert generator("a  red circle") == ["a blue circle", "two red circles"]  # no repeats, no original
    assert generator("a green circle") == []
    bad = {
        "not json": ("{oops", "not valid JSON"),
        "a list": (json.dumps(["a red circle"]), "must hold a JSON object"),
        "not strings": (json.dumps({"a red circle": [1, 2]}), "must be a list of strings"),
        "a string": (json.dumps({"a red circle": "a blue circle"}), "must be a list of strings"),
    }
    for name, (content, message) in bad.items():
        path.write_text(content)
        with pytest.raises(ContrastError, match=message) as error:
            FileContrast(path)
        assert str(path) in str(error.value), name
    with pytest.raises(ContrastError, match="does not exist"):
        FileContrast(tmp_path / "missing.json")


def test_a_prompt_missing_from_the_contrast_file_asks_to_add_it(clip, tmp_path):
    path = tmp_path / "contrasts.json"
    path.write_text(json.dumps({"a red circle": ["a blue circle"]}))
    textnorm = TextNorm(clip, contrast=f"file:{path}")
    with torch.no_grad():
        assert 0 < textnorm(rendered(["a red circle"]), ["a red circle"]).item() < 1
        with pytest.raises(TextNormError, match="'two red circles'.*add the prompt"):
            textnorm(rendered(["two red circles"]), ["two red circles"])


# --- a local language model ---------------------------------------------------------------------------


def tiny_language_model(folder, *, always: str | None = None) -> None:
    """Save a tiny GPT-2 and a byte-level BPE tokenizer trained here on the few-shot text.

    With ``always``, the model is rigged to emit that one token forever: the final layer norm
    outputs a constant vector whose logit is highest for that token (random weights otherwise).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([FEW_SHOT, "a red circle left of a blue square\n"] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    config = GPT2Config(
        vocab_size=len(fast),
        n_positions=512,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=fast.eos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    if always is not None:
        (token,) = fast(always).input_ids
        with torch.no_grad():
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.zero_()
            model.transformer.ln_f.bias[0] = 1.0
            model.transformer.wte.weight[:, 0] = 0.0  # tied to the output layer
            model.transformer.wte.weight[token, 0] = 1.0
    model.save_pretrained(folder)
    fast.save_pretrained(folder)


def test_language_model_generates_parses_and_caches_on_disk(tmp_path, monkeypatch):
    tiny_language_model(tmp_path / "lm")
    cache = tmp_path / "cache" / "contrasts.json"
    generator = from_spec(f"lm:{tmp_path / 'lm'}", cache_file=str(cache), max_new_tokens=24)
    raw = generator.generate("a red circle")
    contrasts = generator("a red circle")
    assert contrasts and contrasts == parse_lines(raw, "a red circle")[:8]  # garbage, but through every step
    stored = json.loads(cache.read_text())
    assert list(stored) == [generator.key] and str((tmp_path / "lm").resolve()) in generator.key
    assert stored[generator.key] == {"a red circle": parse_lines(raw, "a red circle")}

    again = LanguageModelContrast(tmp_path / "lm", cache_file=cache, max_new_tokens=24)
    monkeypatch.setattr(again, "generate", lambda prompt: pytest.fail("a cached prompt was generated again"))
    assert again("a red circle") == contrasts
    other = LanguageModelContrast(tmp_path / "lm", cache_file=cache, max_new_tokens=8)
    assert other.key != generator.key  # other settings, other entries


def test_language_model_output_becomes_contrasts_or_a_clear_error(tmp_path, clip):
    tiny_language_model(tmp_path / "words", always=" red")
    words = LanguageModelContrast(tmp_path / "words", cache_file=tmp_path / "c.json", max_new_tokens=4)
    assert words("a red circle") == ["red red red red"]
    tiny_language_model(tmp_path / "newlines", always="\n")
    blank = LanguageModelContrast(tmp_path / "newlines", cache_file=tmp_path / "c.json", max_new_tokens=4)
    with pytest.raises(TextNormError, match="no contrastive prompts for 'a red circle'.*lm:"):
        TextNorm(clip, contrast=blank)(rendered(["a red circle"]), ["a red circle"])
    assert set(json.loads((tmp_path / "c.json").read_text())) == {words.key, blank.key}


def test_language_model_lines_are_cleaned_deduplicated_and_end_at_a_blank_line():
    generated = "\n1. a blue circle\n- a blue circle\n* 'two red circles'\nA red circle.\n\nCaption: junk\n"
    assert parse_lines(generated, "a red circle") == ["a blue circle", "two red circles"]
    assert parse_lines("a green circle\nCaption: a red square\na blue square", "x") == ["a green circle"]


def test_a_missing_language_model_folder_says_how_to_provide_one(tmp_path):
    with pytest.raises(ContrastError, match=r"no-model.*hf download.*lm:PATH"):
        from_spec(f"lm:{tmp_path / 'no-model'}")
