"""DiffusionGuard, PhotoGuard and AdvDM on a tiny random 9-channel StableDiffusionInpaintPipeline."""

from __future__ import annotations

import pytest
import torch
from diffalign.defenses import (
    METHODS,
    MaskAugmentation,
    ProtectionError,
    advdm,
    augment_mask,
    diffusionguard,
    photoguard,
    protect,
)
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
)

from diffalign import pipeline
from diffalign.inpainting import (
    edit,
    encode_text,
    inpainting_condition,
    load_inpainting,
    tiny_random_inpaint_pipeline,
)

SIZE = 32  # tiny-random-inpaint: 32×32 images, 16×16 latents
FAST = {"budget": 16 / 255, "step_size": 4 / 255, "steps": 4}


@pytest.fixture(scope="module")
def inpaint_pipe() -> StableDiffusionInpaintPipeline:
    return load_inpainting("tiny-random-inpaint")


@pytest.fixture()
def image() -> torch.Tensor:
    picture = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    picture[:, :4] = 1.0  # saturated pixels exercise the [0, 1] projection
    picture[:, -4:] = 0.0
    return picture


@pytest.fixture()
def mask() -> torch.Tensor:
    protected = torch.zeros(1, SIZE, SIZE)
    protected[:, 2:24, 10:26] = 1  # reaches into the saturated rows
    return protected


def seed(value: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(value)


@pytest.mark.parametrize(
    "scheduler, steps",
    [
        (PNDMScheduler.from_config(pipeline.sd_ddim_scheduler().config, skip_prk_steps=True), 4),
        (DDIMScheduler.from_config(pipeline.sd_ddim_scheduler().config, timestep_spacing="trailing"), 4),
        (pipeline.sd_ddim_scheduler(), 50),
        (EulerDiscreteScheduler.from_config(pipeline.sd_ddim_scheduler().config), 4),
    ],
)
def test_attacked_timestep_is_the_editors_first(scheduler, steps):
    assert diffusionguard.attacked_timestep(pipeline.sd_ddim_scheduler(), 4) == 751
    reference = type(scheduler).from_config(scheduler.config)
    reference.set_timesteps(steps)
    assert diffusionguard.attacked_timestep(scheduler, steps) == reference.timesteps[0].item()
    assert scheduler.num_inference_steps is None  # the editor's own scheduler is left alone


def test_loader_gives_9_channel_pipelines_and_refuses_text_to_image(inpaint_pipe, tmp_path, image, mask):
    assert isinstance(inpaint_pipe, StableDiffusionInpaintPipeline)
    assert inpaint_pipe.unet.config.in_channels == 9
    inpaint_pipe.save_pretrained(tmp_path / "inpaint")
    loaded = load_inpainting(str(tmp_path / "inpaint"))
    assert torch.equal(next(loaded.unet.parameters()), next(inpaint_pipe.unet.parameters()))
    assert type(loaded.scheduler) is type(inpaint_pipe.scheduler)

    text_to_image = pipeline.load("tiny-random")
    with pytest.raises(pipeline.PipelineError, match="4 input channels.*text-to-image.*9"):
        load_inpainting(text_to_image)
    with pytest.raises(pipeline.PipelineError, match="4 input channels"):
        diffusionguard.protect(text_to_image, image, mask, **FAST)
    text_to_image.save_pretrained(tmp_path / "t2i")
    with pytest.raises(pipeline.PipelineError, match="not an inpainting model|text-to-image"):
        load_inpainting(str(tmp_path / "t2i"))
    with pytest.raises(pipeline.PipelineError, match="does not exist"):
        load_inpainting(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "method, unet_per_step, vae_per_step, vae_once",
    [("diffusionguard", 1, 1, 0), ("photoguard", 0, 1, 1), ("advdm", 1, 2, 0)],
)
def test_perturbation_stays_in_region_budget_and_range(
    inpaint_pipe, image, mask, method, unet_per_step, vae_per_step, vae_once
):
    result = protect(inpaint_pipe, image, mask, method=method, generator=seed(), **FAST)
    outside = result.perturbation * (1 - mask)
    inside = result.perturbation * mask
    assert torch.equal(outside, torch.zeros_like(outside))
    assert inside.abs().max() <= FAST["budget"] + 1e-6
    assert inside.abs().max() > FAST["budget"] / 2  # it did move
    assert result.image.min() >= 0 and result.image.max() <= 1
    torch.testing.assert_close(result.image, image + result.perturbation)
    assert torch.equal(result.mask, mask)
    assert result.method == method and len(result.objective) == FAST["steps"]
    assert result.unet_calls == unet_per_step * FAST["steps"]
    assert result.vae_calls == vae_per_step * FAST["steps"] + vae_once
    assert result.seconds > 0


def test_diffusionguard_raises_the_noise_norm_on_unseen_noises(inpaint_pipe, image, mask):
    keep = mask[None]
    timestep = diffusionguard.attacked_timestep(inpaint_pipe.scheduler)
    noises = torch.randn(8, 4, SIZE // 2, SIZE // 2, generator=seed(123))
    embeds = encode_text(inpaint_pipe)

    def objective(picture: torch.Tensor) -> float:
        with torch.no_grad():
            norms = diffusionguard.noise_prediction_norm(
                inpaint_pipe, picture[None], keep, timestep, noises, embeds
            )
        return norms.mean().item()

    result = diffusionguard.protect(
        inpaint_pipe, image, mask, budget=0.125, step_size=0.025, steps=10, noise_batch=4, generator=seed()
    )
    assert objective(result.image) > objective(image) + 0.01


def test_photoguard_pulls_the_encoding_toward_grey(inpaint_pipe, image, mask):
    target = photoguard.target_latent(inpaint_pipe, image[None])
    with torch.no_grad():  # as in an app's inference code: protection turns gradients on for itself
        before = photoguard.encoder_distance(inpaint_pipe, image[None], target).item()
        result = photoguard.protect(inpaint_pipe, image, mask, **FAST)
        after = photoguard.encoder_distance(inpaint_pipe, result.image[None], target).item()
    assert after < 0.95 * before
    assert result.objective[-1] > result.objective[0]


def test_advdm_raises_the_expected_denoising_loss(inpaint_pipe, image, mask):
    # The loss at one random (t, ε) is noisy; its expectation over many pairs is what AdvDM raises.
    noise_schedule = DDPMScheduler.from_config(inpaint_pipe.scheduler.config)
    timesteps = torch.randint(0, 1000, (128,), generator=seed(1))
    noises = torch.randn(128, 4, SIZE // 2, SIZE // 2, generator=seed(2))
    embeds = encode_text(inpaint_pipe)

    def expected_loss(picture: torch.Tensor) -> float:
        with torch.no_grad():
            losses = advdm.denoising_loss(
                inpaint_pipe, noise_schedule, picture[None], mask[None], timesteps, noises, embeds
            )
        return losses.mean().item()

    result = advdm.protect(
        inpaint_pipe, image, mask, budget=0.125, step_size=0.0125, steps=20, generator=seed()
    )
    assert expected_loss(result.image) > expected_loss(image)


def test_diffusionguard_makes_one_unet_call_per_step_at_the_attacked_timestep(inpaint_pipe, image, mask):
    timesteps = []
    handle = inpaint_pipe.unet.register_forward_hook(
        lambda module, args, output: timesteps.append(args[1].tolist())
    )
    progress = []
    try:
        result = diffusionguard.protect(
            inpaint_pipe, image, mask, **FAST, progress=lambda *event: progress.append(event)
        )
    finally:
        handle.remove()
    assert timesteps == [[751]] * FAST["steps"]
    assert result.unet_calls == FAST["steps"]
    assert [(done, total) for done, total, _ in progress] == [
        (i + 1, FAST["steps"]) for i in range(FAST["steps"])
    ]
    assert [value for *_, value in progress] == result.objective


def test_protection_is_reproducible_with_a_seed(inpaint_pipe, image, mask):
    first = diffusionguard.protect(inpaint_pipe, image, mask, **FAST, generator=seed(5))
    again = diffusionguard.protect(inpaint_pipe, image, mask, **FAST, generator=seed(5))
    other = diffusionguard.protect(inpaint_pipe, image, mask, **FAST, generator=seed(6))
    assert torch.equal(first.image, again.image)
    assert not torch.equal(first.image, other.image)
    assert all(p.requires_grad for p in inpaint_pipe.unet.parameters())  # weights unfrozen afterwards


def test_mask_augmentation_shrinks_varies_and_reproduces():
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    disc = (((rows - 16) ** 2 + (cols - 16) ** 2) <= 100).float()[None]
    augmentation = MaskAugmentation(strength=0.5, iterations=4, smoothness=0.2)
    generator = seed(7)
    draws = [augment_mask(disc, augmentation, generator) for _ in range(12)]
    for draw in draws:
        assert draw.shape == disc.shape
        assert torch.all(draw <= disc) and draw.sum() > 0  # a non-empty subset
    assert len({tuple(draw.flatten().tolist()) for draw in draws}) > 3
    assert any(draw.sum() < disc.sum() for draw in draws)
    generator = seed(7)
    assert all(torch.equal(draw, augment_mask(disc, augmentation, generator)) for draw in draws)
    assert augment_mask(disc, None, seed(7)) is disc
    assert torch.equal(augment_mask(disc, MaskAugmentation(strength=0.0), seed(7)), disc)
    with pytest.raises(ProtectionError, match="strength"):
        MaskAugmentation(strength=-1)


def test_bad_inputs_are_clear_errors(inpaint_pipe, image, mask):
    with pytest.raises(ProtectionError, match="nothing to protect"):
        protect(inpaint_pipe, image, torch.zeros_like(mask), **FAST)
    with pytest.raises(ProtectionError, match=r"\[0, 255\].*image / 255"):
        protect(inpaint_pipe, image * 255, mask, **FAST)
    with pytest.raises(ProtectionError, match=r"\[-1, 1\]"):
        protect(inpaint_pipe, image * 2 - 1, mask, **FAST)
    with pytest.raises(ProtectionError, match=r"\[3, H, W\].*\(1, 3, 32, 32\)"):
        protect(inpaint_pipe, image[None], mask, **FAST)
    with pytest.raises(ProtectionError, match="divisible by 2"):
        protect(inpaint_pipe, image[:, :31], mask[:, :31], **FAST)
    with pytest.raises(ProtectionError, match=r"\[0, 1\] pixel units.*8/255"):
        protect(inpaint_pipe, image, mask, budget=8, steps=1)
    with pytest.raises(ProtectionError, match="Did you mean 'diffusionguard'"):
        protect(inpaint_pipe, image, mask, method="difusionguard")
    with pytest.raises(ProtectionError, match="photoguard does not take editor_steps"):
        protect(inpaint_pipe, image, mask, method="photoguard", editor_steps=4)
    assert set(METHODS) == {"diffusionguard", "photoguard", "advdm"}


def test_a_mask_of_another_size_is_resized_with_a_warning(inpaint_pipe, image, mask):
    small = mask[:, ::2, ::2]
    with pytest.warns(UserWarning, match="resized"):
        result = photoguard.protect(inpaint_pipe, image, small * 0.9, **FAST)  # soft values binarise at 0.5
    expected = torch.nn.functional.interpolate(small[None], size=(SIZE, SIZE), mode="nearest")[0]
    assert torch.equal(result.mask, expected)
    assert torch.equal(result.perturbation * (1 - expected), torch.zeros_like(result.perturbation))


def test_condition_follows_diffusers_mask_convention(inpaint_pipe, image, mask):
    captured = {}

    def capture(pipe, step, timestep, tensors):
        captured.setdefault("mask", tensors["mask"])
        return {}

    inpaint_pipe(
        prompt="",
        image=image[None],
        mask_image=(1 - mask)[None],  # diffusers: 1 = repaint
        num_inference_steps=1,
        guidance_scale=1.0,
        output_type="pt",
        callback_on_step_end=capture,
        callback_on_step_end_tensor_inputs=["mask"],
    )
    with torch.no_grad():
        condition = inpainting_condition(inpaint_pipe, image[None], mask[None])
        scribbled = image + (1 - mask) * torch.rand(image.shape, generator=seed(3))
        scribbled = inpainting_condition(inpaint_pipe, scribbled.clamp(0, 1)[None], mask[None])
    assert torch.equal(condition.repaint_mask, captured["mask"])
    # The editor never sees the pixels it repaints.
    assert torch.equal(condition.masked_image_latents, scribbled.masked_image_latents)


def test_edit_repaints_outside_the_kept_region(inpaint_pipe, image, mask):
    def run(picture: torch.Tensor, **options) -> torch.Tensor:
        return edit(inpaint_pipe, picture, mask, "a red circle", steps=2, generator=seed(4), **options)

    edited = run(image)
    assert edited.shape == image.shape
    assert edited.min() >= 0 and edited.max() <= 1
    # Only the kept region conditions the edit: repainted pixels of the input do not matter, kept ones do.
    assert torch.equal(run(image * mask), edited)
    assert not torch.equal(run(image * (1 - mask)), edited)
    # A 9-channel editor redraws the kept region too (diffusers does not blend it back) unless asked to.
    pasted = run(image, paste_back=True)
    assert torch.equal(pasted * mask, image * mask)
    assert torch.equal(pasted * (1 - mask), edited * (1 - mask))


def test_tiny_random_inpaint_is_seeded():
    first, second = tiny_random_inpaint_pipeline(seed=0), tiny_random_inpaint_pipeline(seed=0)
    assert torch.equal(next(first.unet.parameters()), next(second.unet.parameters()))
