"""The ShapesWorld models: the training recipe, the shipped weights and their rewards."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from transformers import CLIPModel

from diffalign import pipeline, rewards
from diffalign.shapes import assets, parse, render, scene_for
from diffalign.shapes.training import ShapesTrainingConfig, train_all

TINY_RECIPE = ShapesTrainingConfig(
    dataset_size=200,
    clip_steps=2,
    vae_steps=2,
    unet_steps=2,
    clip_batch_size=16,
    vae_batch_size=8,
    unet_batch_size=8,
)


@pytest.fixture(scope="module")
def tiny_recipe_output(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes-recipe")
    report = train_all(TINY_RECIPE, folder)
    return folder, report


def test_recipe_writes_plain_diffusers_and_transformers_folders(tiny_recipe_output):
    folder, report = tiny_recipe_output
    pipe = StableDiffusionPipeline.from_pretrained(str(folder / "pipeline"), safety_checker=None)
    with safe_open(str(folder / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as stored:
        assert stored.get_tensor(next(iter(stored.keys()))).dtype == torch.float16  # shipped as fp16
    assert pipe.tokenizer.model_max_length == 16
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the data, as SD's was
    clip = CLIPModel.from_pretrained(str(folder / "clip"))
    assert clip.config.vision_config.image_size == 32
    assert set(report["seconds"]) == {"render", "clip", "vae", "unet", "total"}
    assert json.loads((folder / "training_report.json").read_text())["config"]["unet_steps"] == 2


def test_finished_stages_are_reused(tiny_recipe_output, tmp_path):
    folder, first_report = tiny_recipe_output
    copy = tmp_path / "again"
    shutil.copytree(folder / "stages", copy / "stages")
    weights = copy / "stages" / "clip" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    report = train_all(TINY_RECIPE, copy)
    assert weights.stat().st_mtime_ns == before  # loaded, not trained and saved again
    assert report["seconds"]["clip"] == first_report["seconds"]["clip"]  # the time it took when trained
    changed = ShapesTrainingConfig(**{**TINY_RECIPE.__dict__, "clip_steps": 3})
    train_all(changed, copy)
    assert weights.stat().st_mtime_ns != before  # other settings: trained again


def test_missing_and_damaged_weights_name_the_file_and_the_rebuild_command(tiny_recipe_output, tmp_path):
    folder, _ = tiny_recipe_output
    broken = tmp_path / "pipeline"
    shutil.copytree(folder / "pipeline", broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(
        assets.ShapesWeightsError, match=r"unet/diffusion_pytorch_model.safetensors is missing"
    ) as error:
        assets.load_pipeline(broken)
    assert "diffalign shapes train" in str(error.value)
    shutil.copytree(folder / "pipeline", tmp_path / "p2")
    weights = tmp_path / "p2" / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    with pytest.raises(assets.ShapesWeightsError, match="is damaged"):
        assets.load_pipeline(tmp_path / "p2")


def test_shapes_oracle_reward():
    oracle = rewards.build("shapes-oracle")
    rng = np.random.default_rng(0)
    prompts = ["a red circle", "two blue squares", "a green circle left of a yellow triangle"]
    images = torch.stack(
        [torch.from_numpy(np.array(render(scene_for(parse(p), rng)))).permute(2, 0, 1) / 255 for p in prompts]
    )
    assert oracle(images.float(), prompts).tolist() == [1.0, 1.0, 1.0]
    swapped = ["a blue circle", "three blue squares", "a green circle right of a yellow triangle"]
    assert (oracle(images.float(), swapped) < 1).all()
    with pytest.raises(rewards.RewardError, match="shapes-clip"):
        oracle(images[:1].float(), ["a photo of a cat"])


def test_shipped_pipeline_loads_by_name_and_by_folder():
    pipe = pipeline.load("shapes")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    plain = StableDiffusionPipeline.from_pretrained(str(assets.PIPELINE_DIR), safety_checker=None)
    assert plain.unet.config.sample_size == pipe.unet.config.sample_size
    # shapes-flow has its own budget (40 MB more; tests/test_shapes_flow.py).
    total = sum(
        p.stat().st_size for p in assets.WEIGHTS.rglob("*.safetensors") if assets.FLOW_DIR not in p.parents
    )
    # pipeline 17 MB, CLIP 7.4 MB, inpainting UNet 8.4 MB, shapes-negclip 7.4 MB (40.1 MB in all)
    assert total <= 48e6, f"shipped weights are {total / 1e6:.1f} MB, budget 48 MB"


def test_shapes_clip_is_differentiable_and_prefers_the_right_caption():
    reward = rewards.build("shapes-clip")
    rng = np.random.default_rng(1)
    prompts = ["a red circle", "a blue square", "a yellow triangle", "a cyan circle"]
    images = (
        torch.stack(
            [
                torch.from_numpy(np.array(render(scene_for(parse(p), rng)))).permute(2, 0, 1) / 255
                for p in prompts
            ]
        )
        .float()
        .requires_grad_(True)
    )
    matched = reward(images, prompts)
    matched.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with torch.no_grad():
        shuffled = reward(images, prompts[1:] + prompts[:1])
    assert (matched.detach() > shuffled).float().mean() >= 0.75
