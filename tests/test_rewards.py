"""Tests for the built-in rewards, on tiny seeded models of the real classes (no downloads)."""

from __future__ import annotations

import io
import math

import huggingface_hub
import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from diffalign.rewards import (
    TINY_RANDOM,
    MissingCheckpointError,
    Reward,
    RewardError,
    available,
    build,
    checked_call,
    info,
)
from diffalign.rewards.aesthetic import AestheticMLP
from diffalign.rewards.clip_preprocess import ClipImageTransform
from open_clip.transform import image_transform as open_clip_pil_transform
from PIL import Image
from torchvision.transforms import InterpolationMode
from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

MODEL_REWARDS = ["aesthetic", "clip-score", "hpsv2", "pickscore"]
JPEG_REWARDS = ["jpeg-compressibility", "jpeg-incompressibility"]
PROMPTS = ["a red circle", "a blue square left of a green triangle", "two yellow stars"]
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture
def images() -> torch.Tensor:
    """Three non-square images (so resize and crop/pad do real work): flat grey, noise, a ramp."""
    generator = torch.Generator().manual_seed(0)
    height, width = 48, 40
    flat = torch.full((3, height, width), 0.5)
    noise = torch.rand(3, height, width, generator=generator)
    ramp = torch.linspace(0, 1, width).expand(3, height, width).clone()
    return torch.stack([flat, noise, ramp])  # [3, 3, 48, 40]


@pytest.fixture(scope="module")
def tiny() -> dict[str, Reward]:
    return {name: build(name, checkpoint=TINY_RANDOM) for name in MODEL_REWARDS}


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """Point the Hugging Face cache at an empty folder, so 'not cached' holds on any machine."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


# --- JPEG ---------------------------------------------------------------------------------


def pil_jpeg_kb(image: torch.Tensor) -> float:
    array = (image * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_jpeg_rewards_are_the_pil_jpeg_size_in_kb(images):
    expected = torch.tensor([pil_jpeg_kb(image) for image in images])
    assert torch.equal(checked_call(build("jpeg-incompressibility"), images, PROMPTS), expected)
    assert torch.equal(checked_call(build("jpeg-compressibility"), images, PROMPTS), -expected)


def test_flat_image_is_more_compressible_than_noise(images):
    scores = build("jpeg-compressibility")(images, PROMPTS)
    assert scores[0] > scores[1]  # flat grey beats noise


# --- every model reward, tiny and random ---------------------------------------------------


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_tiny_reward_is_finite_deterministic_and_tells_images_apart(name, tiny, images):
    scores = checked_call(tiny[name], images, PROMPTS)
    fresh = build(name, checkpoint=TINY_RANDOM)  # a second, identically seeded model
    again = checked_call(fresh, images, PROMPTS)
    assert scores.shape == (3,)
    assert torch.equal(scores, again)
    assert (scores[1:] - scores[:-1]).abs().min() > 1e-6


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_gradients_reach_pixels_but_not_weights(name, tiny, images):
    reward = tiny[name]
    pixels = images.clone().requires_grad_(True)
    reward(pixels, PROMPTS).sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    assert all(not parameter.requires_grad for parameter in reward.parameters())
    assert not any(module.training for module in reward.modules())  # dropout off


def test_registry_matches_what_it_builds(tiny):
    built = {**tiny, **{name: build(name) for name in JPEG_REWARDS}}
    assert set(built) <= {entry.name for entry in available()}
    for name, reward in built.items():
        entry = info(name)
        assert isinstance(reward, Reward) and reward.name == name
        assert reward.differentiable == entry.differentiable
        assert entry.needs_checkpoint == (name in MODEL_REWARDS)


def test_tiny_models_are_the_real_classes_and_leave_the_global_rng_alone(tiny):
    state = torch.get_rng_state()
    reward = build("clip-score", checkpoint=TINY_RANDOM)
    assert torch.equal(torch.get_rng_state(), state)
    assert isinstance(reward.encoder.model, open_clip.model.CLIP)
    assert isinstance(tiny["pickscore"].model, CLIPModel)


# --- each score equals an independent computation ------------------------------------------


def reference_pixels(images: torch.Tensor, size: int, resize_mode: str) -> torch.Tensor:
    """CLIP preprocessing with torchvision: resize (short side / to fit), center crop (pads with 0), normalise."""
    if resize_mode == "shortest":
        resized = TF.resize(images, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    else:
        scale = size / max(images.shape[-2:])
        new_size = [round(images.shape[-2] * scale), round(images.shape[-1] * scale)]
        resized = TF.resize(images, new_size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.normalize(TF.center_crop(resized, [size, size]), OPENAI_MEAN, OPENAI_STD)


@pytest.mark.parametrize(("name", "resize_mode"), [("clip-score", "shortest"), ("hpsv2", "longest")])
def test_open_clip_scores_are_the_embedding_cosine(name, resize_mode, tiny, images):
    encoder = tiny[name].encoder
    assert encoder.transform.resize_mode == resize_mode
    pixels = reference_pixels(images, 32, resize_mode)
    with torch.no_grad():
        image_features = F.normalize(encoder.model.encode_image(pixels), dim=-1)
        text_features = F.normalize(encoder.model.encode_text(open_clip.tokenize(PROMPTS)), dim=-1)
        expected = torch.diagonal(image_features @ text_features.T)
        scores = tiny[name](images, PROMPTS)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_aesthetic_is_the_linear_mlp_on_the_normalised_image_embedding(tiny, images):
    reward = tiny["aesthetic"]
    with torch.no_grad():
        x = F.normalize(reward.encoder.model.encode_image(reference_pixels(images, 32, "shortest")), dim=-1)
        for index in (0, 2, 4, 6, 7):  # the Linear layers; the Dropouts in between are off
            layer = reward.mlp.layers[index]
            x = x @ layer.weight.T + layer.bias
        scores = reward(images, PROMPTS)
    torch.testing.assert_close(scores, x.squeeze(-1), atol=1e-5, rtol=1e-5)


def tiny_image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def test_pickscore_is_the_scaled_cosine_of_clip_model_features(tiny, images):
    reward = tiny["pickscore"]
    model = reward.model
    pixel_values = tiny_image_processor()(images=images, do_rescale=False, return_tensors="pt").pixel_values
    tokens = reward.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=pixel_values).pooler_output
        text_embeds = model.get_text_features(**tokens).pooler_output
        expected = model.logit_scale.exp() * F.cosine_similarity(image_embeds, text_embeds, dim=-1)
        scores = reward(images, PROMPTS)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest"])
def test_torch_preprocessing_matches_open_clips_pil_pipeline(resize_mode, images):
    """Only PIL's uint8 rounding separates the two: under 2/255 per pixel before normalising."""
    transform = ClipImageTransform(size=(32, 32), mean=OPENAI_MEAN, std=OPENAI_STD, resize_mode=resize_mode)
    pil_transform = open_clip_pil_transform(
        32, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD, resize_mode=resize_mode
    )
    smooth = images[2:]  # the ramp: bicubic overshoot and clamping stay out of the comparison
    pil = Image.fromarray((smooth[0] * 255).round().byte().permute(1, 2, 0).numpy())
    difference = (transform(smooth)[0] - pil_transform(pil)) * torch.tensor(OPENAI_STD).view(3, 1, 1)
    assert difference.abs().max() < 2 / 255


# --- real checkpoints: layouts, local folders, and errors that teach ------------------------


def real_aesthetic_state_dict() -> dict[str, torch.Tensor]:
    """Key names and shapes of sac+logos+ava1-l14-linearMSE.pth (values random)."""
    shapes = {
        "layers.0": (1024, 768),
        "layers.2": (128, 1024),
        "layers.4": (64, 128),
        "layers.6": (16, 64),
        "layers.7": (1, 16),
    }
    state = {}
    for prefix, (out_features, in_features) in shapes.items():
        state[f"{prefix}.weight"] = torch.randn(out_features, in_features)
        state[f"{prefix}.bias"] = torch.randn(out_features)
    return state


def test_aesthetic_mlp_has_the_real_checkpoint_layout():
    mlp = AestheticMLP()
    mlp.load_state_dict(real_aesthetic_state_dict())  # strict: same keys, same shapes
    assert mlp(torch.randn(2, 768)).shape == (2,)


def test_aesthetic_finds_its_mlp_then_names_the_missing_clip_weights(tmp_path, empty_hf_cache):
    mlp_file = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(real_aesthetic_state_dict(), mlp_file)
    with pytest.raises(MissingCheckpointError) as error:
        build("aesthetic", checkpoint=str(mlp_file))
    message = str(error.value)
    assert "timm/vit_large_patch14_clip_224.openai" in message and "clip_checkpoint=" in message


@pytest.mark.parametrize(
    ("name", "filename", "command"),
    [
        ("aesthetic", "sac+logos+ava1-l14-linearMSE.pth", "improved-aesthetic-predictor"),
        ("clip-score", "ViT-L-14.bin", "hf download timm/vit_large_patch14_clip_224.openai"),
        ("hpsv2", "HPS_v2_compressed.pt", "hf download xswu/HPSv2 HPS_v2_compressed.pt"),
    ],
)
def test_missing_checkpoint_file_is_named_with_how_to_get_it(name, filename, command, tmp_path):
    with pytest.raises(MissingCheckpointError) as error:
        build(name, checkpoint=str(tmp_path / filename))
    message = str(error.value)
    assert filename in message and command in message and "checkpoint=" in message


@pytest.mark.parametrize(
    ("name", "named"),
    [
        ("clip-score", "hf download timm/vit_large_patch14_clip_224.openai open_clip_pytorch_model.bin"),
        ("hpsv2", "hf download xswu/HPSv2 HPS_v2_compressed.pt"),
        ("pickscore", "hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    ],
)
def test_weights_absent_from_the_hf_cache_are_named(name, named, empty_hf_cache):
    with pytest.raises(MissingCheckpointError, match="Hugging Face cache") as error:
        build(name)
    assert named in str(error.value)


def test_pickscore_loads_local_folders_and_names_a_missing_model(tiny, images, tmp_path):
    reward = tiny["pickscore"]
    CLIPProcessor(image_processor=tiny_image_processor(), tokenizer=reward.tokenizer).save_pretrained(
        tmp_path / "proc"
    )
    reward.model.save_pretrained(tmp_path / "model")
    loaded = build("pickscore", checkpoint=str(tmp_path / "model"), processor=str(tmp_path / "proc"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, PROMPTS), reward(images, PROMPTS))
    with pytest.raises(MissingCheckpointError, match="yuvalkirstain/PickScore_v1"):
        build("pickscore", checkpoint=str(tmp_path / "PickScore_v1"), processor=str(tmp_path / "proc"))


def test_bad_names_suggest_the_closest():
    with pytest.raises(RewardError, match="jpeg-compressibility"):
        build("jpeg-compresibility")
    with pytest.raises(RewardError, match="ViT-L-14"):
        build("clip-score", arch="ViT-L-41")
    with pytest.raises(RewardError, match="v2.1"):
        build("hpsv2", version="v2.l")
    with pytest.raises(RewardError, match="checkpont"):
        build("pickscore", checkpont=TINY_RANDOM)
    assert info("hpsv2").needs_checkpoint


# --- checked_call ------------------------------------------------------------------------


class ConstantReward:
    name = "constant"
    differentiable = False

    def __init__(self, scores: torch.Tensor):
        self.scores = scores

    def __call__(self, images, prompts):
        return self.scores


def test_checked_call_rejects_nan_wrong_shapes_and_counts(images):
    with pytest.raises(RewardError, match="non-finite"):
        checked_call(ConstantReward(torch.tensor([0.0, math.nan, 1.0])), images, PROMPTS)
    with pytest.raises(RewardError, match="expected a tensor of shape"):
        checked_call(ConstantReward(torch.zeros(3, 1)), images, PROMPTS)
    with pytest.raises(RewardError, match=r"\[B, 3, H, W\]"):
        checked_call(ConstantReward(torch.zeros(3)), images[:, :1], PROMPTS)
    with pytest.raises(RewardError, match="3 images but 2 prompts"):
        checked_call(ConstantReward(torch.zeros(3)), images, PROMPTS[:2])
