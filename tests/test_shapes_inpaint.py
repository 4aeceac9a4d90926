"""The ShapesWorld inpainting recipe at toy size: initialisation, masks, training, resuming,
saving and loading, and the editor's quality check.

The shipped inpainting UNet is trained by the lead with ``diffalign shapes train-inpaint``;
until it is in the package, loading ``shapes-inpaint`` is tested on a toy UNet installed in a
temporary folder.
"""

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from safetensors import safe_open

from diffalign import cli, pipeline
from diffalign.inpainting import edit, load_inpainting
from diffalign.shapes import assets, detect, inpaint_training, parse, render, scene_for
from diffalign.shapes import cli as shapes_cli
from diffalign.shapes.inpaint_training import (
    MASK_MIX,
    InpaintTrainingConfig,
    draw_batch,
    edit_set,
    init_inpainting_unet,
    inpainting_loss,
    inpainting_quality,
    object_regions,
    prepare_data,
    random_repaint_mask,
    train_inpainting,
    train_inpainting_unet,
)
from diffalign.shapes.training import render_dataset
from diffalign.shapes.world import BACKGROUND

TOY = InpaintTrainingConfig(
    dataset_size=48, steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2, eval_scenes=2, eval_steps=2
)


@pytest.fixture(scope="module")
def base():
    return assets.load_pipeline()


@pytest.fixture(scope="module")
def data(base):
    return prepare_data(base, render_dataset(32, seed=5))


@pytest.fixture(scope="module")
def toy_output(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inpaint-recipe")
    return folder, train_inpainting(TOY, folder)


def _train(base, data, config, folder):
    settings = dataclasses.asdict(config)  # what a resumed run must match
    unet, _ = train_inpainting_unet(base, data, config, folder / inpaint_training.CHECKPOINT, settings)
    return unet


def test_zero_initialised_channels_reproduce_the_base_unet(base):
    unet = init_inpainting_unet(base.unet).eval()
    assert unet.config.in_channels == 9
    assert unet.conv_in.weight[:, 4:].abs().max() == 0
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    text = torch.randn(3, 16, base.unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([10, 500, 990])
    with torch.no_grad():
        expected = base.unet(latents, timesteps, encoder_hidden_states=text).sample
        for _ in range(2):  # any mask and masked-image latents
            mask = (torch.rand(3, 1, 8, 8, generator=generator) > 0.5).float()
            masked = 3 * torch.randn(3, 4, 8, 8, generator=generator)
            wide = torch.cat([latents, mask, masked], dim=1)
            got = unet(wide, timesteps, encoder_hidden_states=text).sample
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_masks_of_every_kind():
    image = render(scene_for(parse("a red circle left of a blue square"), np.random.default_rng(0)))
    regions = torch.from_numpy(object_regions(image))
    assert regions.max() == 2  # one region per object
    generator = torch.Generator().manual_seed(0)
    draws = {kind: [random_repaint_mask(kind, regions, generator) for _ in range(20)] for kind in MASK_MIX}
    assert all(m.eq(1).all() for m in draws["everything"])
    assert all(m.eq(0).all() for m in draws["nothing"])
    for mask in draws["keep-object"]:
        kept = regions[mask == 0]
        assert kept.min() > 0 and kept.unique().numel() == 1  # exactly the pixels of one object
        assert (mask == 0).sum() == (regions == kept[0]).sum()
    for kind in ("boxes", "blob"):
        shares = torch.stack([m.mean() for m in draws[kind]])
        assert ((shares > 0.02) & (shares < 0.98)).all(), kind  # partial masks, never empty or full
        assert shares.std() > 0.05, kind  # of varied size
    with pytest.raises(ValueError, match="keep-object"):
        random_repaint_mask("ring", regions, generator)


def test_the_training_loop_fits_a_batch_and_learns_the_new_channels(base, data, tmp_path, monkeypatch):
    # One batch over and over: from a trained UNet, a toy run on fresh random batches moves the
    # loss by less than its noise, while fitting one batch shows every part of the loop working.
    fixed = draw_batch(base, data, 8, 0.1, torch.Generator().manual_seed(123))
    monkeypatch.setattr(inpaint_training, "draw_batch", lambda *args: fixed)
    config = dataclasses.replace(TOY, steps=12, batch_size=8, learning_rate=3e-4, ema_decay=0.0)
    trained = _train(base, data, config, tmp_path)
    with torch.no_grad():
        before = inpainting_loss(init_inpainting_unet(base.unet).eval(), fixed).item()
        after = inpainting_loss(trained, fixed).item()
    assert after < 0.7 * before, (before, after)
    assert trained.conv_in.weight[:, 4:].abs().max() > 0  # the mask and masked-image channels are trained


def test_an_interrupted_run_resumes_to_the_uninterrupted_weights(base, data, tmp_path, monkeypatch):
    config = dataclasses.replace(TOY, steps=6)
    expected = _train(base, data, config, tmp_path / "whole").state_dict()

    calls = []
    real_draw = inpaint_training.draw_batch

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_draw(*args)

    monkeypatch.setattr(inpaint_training, "draw_batch", interrupted)
    folder = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _train(base, data, config, folder)
    assert torch.load(folder / inpaint_training.CHECKPOINT, weights_only=True)["step"] == 4
    calls.clear()
    resumed = _train(base, data, config, folder).state_dict()
    assert len(calls) == 2  # steps 5 and 6 only
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name


def test_recipe_writes_a_standalone_diffusers_inpainting_folder(toy_output):
    folder, report = toy_output
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as stored:
        weight = stored.get_tensor("conv_in.weight")
    assert weight.dtype == torch.float16 and weight.shape[1] == 9  # shipped as fp16, 9 input channels
    assert not (folder / inpaint_training.CHECKPOINT).exists()  # removed once the UNet is saved

    plain = StableDiffusionInpaintPipeline.from_pretrained(str(folder / "pipeline"), safety_checker=None)
    assert type(plain.scheduler).__name__ == "DDIMScheduler"
    assert torch.equal(plain.unet.conv_in.weight, weight)
    editor = load_inpainting(str(folder / "pipeline"))
    edits = edit_set(1, seed=3)
    out = edit(
        editor,
        edits.images[0],
        edits.keep_masks[0],
        edits.prompts[0],
        steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape == (3, 32, 32) and torch.isfinite(out).all()

    assert set(report["evaluation"]) == {"inpainting", "blended-base"}
    for quality in report["evaluation"].values():
        assert quality["scenes"] == 2
        assert 0 <= quality["success"] <= quality["score"] <= 1 and 0 <= quality["kept_error"] <= 1
    assert report["mask_mix"] == MASK_MIX and report["seconds"]["train"] > 0


def test_a_finished_unet_is_reused(toy_output, tmp_path):
    folder, first = toy_output
    again = tmp_path / "again"
    shutil.copytree(folder, again)
    weights = again / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    report = train_inpainting(dataclasses.replace(TOY, eval_scenes=0), again)
    assert weights.stat().st_mtime_ns == before and report["seconds"]["train"] == first["seconds"]["train"]
    train_inpainting(dataclasses.replace(TOY, steps=3, eval_scenes=0), again)
    assert weights.stat().st_mtime_ns != before  # other settings: trained again


def test_shapes_inpaint_loads_by_name_from_the_installed_unet(toy_output, tmp_path, monkeypatch):
    folder, _ = toy_output
    installed = tmp_path / "inpaint" / "unet"
    inpaint_training.install(folder / "unet", installed)
    files = sorted(p.name for p in installed.iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]  # no training state
    monkeypatch.setattr(assets, "INPAINT_UNET_DIR", installed)
    shapes = pipeline.load("shapes")
    for pipe in (pipeline.load("shapes-inpaint"), load_inpainting("shapes-inpaint")):
        assert isinstance(pipe, StableDiffusionInpaintPipeline) and pipe.unet.config.in_channels == 9
        assert type(pipe.scheduler).__name__ == "DDIMScheduler"
        assert torch.equal(pipe.vae.encoder.conv_in.weight, shapes.vae.encoder.conv_in.weight)  # shipped VAE

    argv = ["shapes", "train-inpaint", "-o", str(tmp_path), "--steps", "3", "--install"]
    args = cli.build_parser().parse_args(argv)
    assert args.handler is shapes_cli.train_inpaint and args.steps == 3 and args.install


def test_missing_and_damaged_inpaint_weights_name_the_file_and_the_command(toy_output, tmp_path, monkeypatch):
    folder, _ = toy_output
    broken = tmp_path / "unet"
    shutil.copytree(folder / "unet", broken)
    (broken / "diffusion_pytorch_model.safetensors").unlink()
    monkeypatch.setattr(assets, "INPAINT_UNET_DIR", broken)
    missing = r"unet/diffusion_pytorch_model.safetensors is missing"
    with pytest.raises(assets.ShapesWeightsError, match=missing) as error:
        load_inpainting("shapes-inpaint")
    assert "diffalign shapes train-inpaint --output <folder> --install" in str(error.value)
    weights = broken / "diffusion_pytorch_model.safetensors"
    original = (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    weights.write_bytes(original[: len(original) // 2])
    with pytest.raises(assets.ShapesWeightsError, match="is damaged"):
        pipeline.load("shapes-inpaint")


def test_edit_set_keeps_one_object_and_the_quality_check_can_tell(tmp_path):
    edits = edit_set(6, seed=1)
    perfect = inpainting_quality(edits.images, edits)
    assert (perfect.success, perfect.score, perfect.kept_error) == (1.0, 1.0, 0.0)
    grey = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1) / 255
    for image, keep, prompt in zip(edits.images, edits.keep_masks, edits.prompts):
        found = detect(image * keep + grey[0] * (1 - keep))
        assert len(found) == 1 and (found[0].colour, found[0].shape) in parse(prompt).pairs
    blank = inpainting_quality(grey.expand_as(edits.images), edits)
    assert blank.success == 0.0 and blank.kept_error > 0.1
