"""shapes-flow: the recipe writes a plain StableDiffusion3Pipeline folder, the shipped one loads by name
and with plain diffusers, and diffalign's sampler draws what diffusers draws from it."""

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors import safe_open

from diffalign import families, pipeline
from diffalign.sampling import sample
from diffalign.shapes import assets, flow_model

PROMPTS = ["two red circles", "a blue square left of a green triangle"]


@pytest.fixture(scope="module")
def tiny_flow_recipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flow-recipe")
    config = flow_model.FlowTrainingConfig(dataset_size=64, steps=3, batch_size=8)
    return folder, flow_model.train_flow_model(config, folder)


def test_the_recipe_writes_a_plain_sd3_folder_that_trains_its_loss_down(tiny_flow_recipe):
    folder, report = tiny_flow_recipe
    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(folder / "pipeline"), text_encoder_3=None, tokenizer_3=None
    )
    assert pipe.text_encoder_3 is None and pipe.transformer.config.joint_attention_dim == 128
    weights = folder / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), "pt") as stored:
        assert stored.get_tensor(next(iter(stored.keys()))).dtype == torch.float16  # shipped as fp16
    assert report["parameters"] == sum(p.numel() for p in flow_model.new_transformer().parameters())
    assert len(report["losses"]) == 3


def test_the_text_encoders_are_the_shapesworld_clip_towers():
    clip, tokenizer = assets.load_clip(assets.CLIP_DIR)
    encoder = flow_model.text_encoder_with_projection(clip)
    ids = tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = clip.get_text_features(input_ids=ids)
        expected = getattr(expected, "pooler_output", expected)  # transformers 5 may return an output object
        assert torch.allclose(encoder(ids).text_embeds, expected, atol=1e-5)


def test_shapes_flow_loads_by_name_and_with_plain_diffusers():
    pipe = pipeline.load("shapes-flow")
    assert isinstance(pipe, StableDiffusion3Pipeline) and families.of(pipe).denoiser_name == "transformer"
    plain = StableDiffusion3Pipeline.from_pretrained(
        str(assets.FLOW_DIR), text_encoder_3=None, tokenizer_3=None, **pipeline.dtype_argument(torch.float32)
    )
    latents = families.of(pipe).initial_latents(pipe, 2, torch.Generator().manual_seed(0))
    ours = sample(pipe, PROMPTS, num_steps=8, guidance_scale=5.0, eta=0.0, latents=latents)
    theirs = plain(
        PROMPTS,
        latents=latents,
        num_inference_steps=8,
        guidance_scale=5.0,
        max_sequence_length=flow_model.MAX_SEQUENCE_LENGTH,
        output_type="pt",
    ).images
    assert torch.allclose(ours.images, theirs.float(), atol=2e-3)


def test_shipped_flow_weights_stay_small():
    size = sum(path.stat().st_size for path in Path(assets.FLOW_DIR).rglob("*") if path.is_file())
    assert size <= 40e6, f"shapes-flow adds {size / 1e6:.1f} MB"


def test_missing_flow_weights_name_the_rebuild_command(tmp_path):
    broken = tmp_path / "flow"
    shutil.copytree(assets.FLOW_DIR, broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(assets.ShapesWeightsError, match="train-flow"):
        assets.load_flow_pipeline(broken)
