"""ImageReward and BLIP-2 ITM: tiny randomly initialised models of the real classes, saved to a
folder the way the real checkpoints are laid out, loaded back by the rewards, and held against
independent computations (timm's ViT for BLIP's image encoder, transformers' own BLIP-2 forward)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import timm
import torch
from diffalign.rewards import MissingCheckpointError, RewardError, build, checked_call, imagereward
from diffalign.rewards import blip2 as blip2_module
from diffalign.rewards.cross_encoder import tiny_bert_vocab
from PIL import Image
from torch import nn
from transformers import BertTokenizer, BlipImageProcessor, BlipTextConfig
from transformers.models.blip.modeling_blip_text import BlipTextModel

PROMPTS = ["a red car", "two dogs on the street", "a realistic photo of an airplane"]
HEAD_SIZES = [32, 24, 16, 8, 4, 1]


@pytest.fixture(scope="module")
def released_imagereward(tmp_path_factory):
    """A tiny ImageReward checkpoint in the released layout: a timm ViT under blip.visual_encoder.,
    a BLIP text encoder under blip.text_encoder., the head under mlp.layers.<0,2,4,6,7>, BLIP's
    unused projections, med_config.json and BERT's vocab.txt."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ImageReward")
    (folder / "vocab.txt").write_text("\n".join(tiny_bert_vocab()) + "\n", "utf-8")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=1,
        mlp_ratio=2.0,
        qkv_bias=True,
        num_classes=0,
    ).eval()
    med = {
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "encoder_width": 64,
        "add_cross_attention": True,
    }
    (folder / "med_config.json").write_text(json.dumps(med), "utf-8")
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=med["vocab_size"],
            hidden_size=32,
            encoder_hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            bos_token_id=2,
            eos_token_id=3,
            sep_token_id=3,
        ),
        add_pooling_layer=False,
    ).eval()
    head = [nn.Linear(a, b) for a, b in itertools.pairwise(HEAD_SIZES)]
    state = {f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()}
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    for index, layer in zip((0, 2, 4, 6, 7), head):
        state.update({f"mlp.layers.{index}.{k}": v for k, v in layer.state_dict().items()})
    state.update(
        {"blip.vision_proj.weight": torch.randn(16, 64), "blip.text_proj.weight": torch.randn(16, 32)}
    )
    torch.save(state, folder / "ImageReward.pt")
    return folder, vit, text, head, tokenizer


def test_imagereward_loads_the_released_layout_and_scores_as_blip_and_its_head_compute(released_imagereward):
    folder, vit, text, head, tokenizer = released_imagereward
    reward = build("imagereward", checkpoint=str(folder))
    images = torch.rand(3, 3, 40, 48)
    with torch.no_grad():
        pixels = reward.transform(images)
        features = vit.forward_features(pixels)  # timm: [B, 1 + 16, 64] after the final norm
        torch.testing.assert_close(reward.embed_images(images), features, atol=1e-5, rtol=1e-5)
        tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
        hidden = text(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=features,
            encoder_attention_mask=torch.ones(features.shape[:-1], dtype=torch.long),
        ).last_hidden_state[:, 0]
        for layer in head:  # no activation between the layers, as released
            hidden = layer(hidden)
        expected = (hidden.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    scores = checked_call(reward, images, PROMPTS)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert scores.std() > 0


def test_cross_encoders_score_candidates_as_they_score_pairs_and_pass_gradients(released_imagereward):
    rewards = [
        build("imagereward", checkpoint=str(released_imagereward[0])),
        build("blip2", checkpoint="tiny-random"),
    ]
    images = torch.rand(2, 3, 32, 32)
    candidates = [["a red car", "a blue car", "two red cars"], ["a cat", "a dog", "a cat and a dog"]]
    for reward in rewards:
        table = reward.score_candidates(images, candidates)
        assert table.shape == (2, 3)
        for b, row in enumerate(candidates):
            pairs = reward(images[b : b + 1].expand(len(row), -1, -1, -1), row)
            torch.testing.assert_close(table[b], pairs, atol=1e-5, rtol=1e-5)
        pixels = images.clone().requires_grad_(True)
        reward(pixels, ["a red car", "a cat"]).sum().backward()
        assert reward.differentiable and pixels.grad.abs().sum() > 0


def test_imagereward_rejects_a_checkpoint_with_tensors_it_does_not_have(released_imagereward, tmp_path):
    folder = released_imagereward[0]
    state = torch.load(folder / "ImageReward.pt", weights_only=True)
    state["blip.text_decoder.cls.weight"] = torch.zeros(2)
    for name in ("med_config.json", "vocab.txt"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(RewardError, match="blip.text_decoder.cls.weight"):
        build("imagereward", checkpoint=str(tmp_path))


@pytest.fixture(scope="module")
def saved_blip2(tmp_path_factory):
    """A tiny ``Blip2ForImageTextRetrieval`` saved with its tokenizer and image processor."""
    folder = tmp_path_factory.mktemp("blip2-itm")
    (folder / "vocab.txt").write_text("\n".join(tiny_bert_vocab()) + "\n", "utf-8")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    model = blip2_module.Blip2ForImageTextRetrieval(blip2_module.tiny_config(tokenizer.vocab_size)).eval()
    with torch.no_grad():
        model.query_tokens.normal_()  # zeros at init would make every query alike
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder, model, tokenizer


def test_blip2_scores_are_the_itm_log_odds_of_transformers_own_forward(saved_blip2):
    folder, model, tokenizer = saved_blip2
    reward = build("blip2", checkpoint=str(folder))
    images = torch.rand(3, 3, 32, 32)
    tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(
            pixel_values=reward.transform(images),
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            use_image_text_matching_head=True,
        ).logits_per_image
    scores = checked_call(reward, images, PROMPTS)
    torch.testing.assert_close(scores, logits[:, 1] - logits[:, 0], atol=1e-5, rtol=1e-5)
    assert scores.std() > 0
    # The torch preprocessing is the saved processor's, up to its uint8 rounding.
    picture = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    processed = BlipImageProcessor.from_pretrained(folder)(Image.fromarray(picture), return_tensors="pt")
    ours = reward.transform(torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255)
    torch.testing.assert_close(ours, processed.pixel_values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "names"),
    [
        ("imagereward", ["ImageReward.pt", "med_config.json", "hf download THUDM/ImageReward"]),
        ("blip2", ["BlipImageProcessor", "hf download Salesforce/blip2-itm-vit-g"]),
    ],
)
def test_a_missing_checkpoint_is_one_line_naming_it_and_how_to_get_it(name, names, tmp_path):
    with pytest.raises(MissingCheckpointError) as caught:
        build(name, checkpoint=str(tmp_path / "empty"))
    message = str(caught.value)
    assert "\n" not in message and all(part in message for part in names) and "checkpoint=" in message


def test_imagereward_asks_for_the_bert_vocabulary_when_it_is_missing(released_imagereward, tmp_path):
    folder = released_imagereward[0]
    for name in ("ImageReward.pt", "med_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(MissingCheckpointError, match=r"vocab.txt.*tokenizer=DIR"):
        build("imagereward", checkpoint=str(tmp_path), tokenizer=str(tmp_path / "no-bert"))


def test_textnorm_variants_over_these_members_are_reward_names():
    members = {"imagereward": {"checkpoint": "tiny-random"}, "blip2": {"checkpoint": "tiny-random"}}
    mean = build("textnorm(imagereward,blip2)", contrast="rules", **members)
    regularised = build("textnorm-ur(imagereward,blip2)", contrast="rules", **members)
    assert regularised.name == "textnorm-ur(imagereward,blip2)" and regularised.uncertainty_weight == 1.0
    assert mean.scales == [imagereward.REWARD_STD, 1.0]
    images, prompts = torch.rand(2, 3, 32, 32), ["two red cars", "a blue bird left of a tree"]
    candidates = [(p, *mean.contrasts(p)) for p in prompts]
    probabilities = mean.member_probabilities(images, candidates)  # [2 members, 2 images]
    torch.testing.assert_close(mean(images, prompts), probabilities.mean(0))
    torch.testing.assert_close(
        regularised(images, prompts), probabilities.mean(0) - probabilities.var(0, unbiased=False)
    )
