"""MuDI's Seg-Mix, Cut-Mix, mean-shifted initialisation and masks (diffalign.mudi), on synthetic
subjects whose pixels are known by colour: a red disc and a blue square, each on its own background."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from diffalign import mudi
from diffalign.sampling import initial_latents
from diffalign.subjects import Subject, SubjectError, SubjectImages

RED, BLUE = (255, 0, 0), (0, 0, 255)
GREY, GREEN = (128, 128, 128), (0, 160, 0)


def disc_subject(size: int = 32) -> SubjectImages:
    """A red disc on grey, with its exact mask."""
    image, mask = Image.new("RGB", (size, size), GREY), Image.new("L", (size, size), 0)
    box = (size // 4, size // 4, 3 * size // 4 - 1, 3 * size // 4 - 1)
    ImageDraw.Draw(image).ellipse(box, fill=RED)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return SubjectImages(Subject("olis", "toy", Path("olis")), [image], [mask])


def square_subject(size: int = 32) -> SubjectImages:
    """A blue square on green, off-centre and not square-cropped, with its exact mask."""
    image, mask = Image.new("RGB", (size, size), GREEN), Image.new("L", (size, size), 0)
    box = (size // 8, size // 2, size // 2, 7 * size // 8)
    ImageDraw.Draw(image).rectangle(box, fill=BLUE)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return SubjectImages(Subject("hta", "dog", Path("hta")), [image], [mask])


def pixels_of(image: Image.Image, color: tuple[int, int, int]) -> np.ndarray:
    return np.all(np.asarray(image) == color, axis=-1)


def box_of(found: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(found.any(axis=1)), np.flatnonzero(found.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@pytest.mark.parametrize("resolution", [32, 512])
def test_seg_mix_places_both_subjects_apart_on_a_plain_background(resolution):
    subjects = [disc_subject(), square_subject()]
    for seed in range(5):
        image, caption = mudi.seg_mix(subjects, np.random.default_rng(seed), resolution=resolution)
        assert image.size == (resolution, resolution) and image.mode == "RGB"
        red, blue = pixels_of(image, RED), pixels_of(image, BLUE)
        assert red.sum() >= 9 and blue.sum() >= 9  # both subjects present, at least 3×3 px
        a, b = box_of(red), box_of(blue)
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]  # disjoint
        # Everything outside the two subjects is one plain colour: the references' median background,
        # here the grey or green both references show around their subjects.
        outside_boxes = np.ones(red.shape, bool)
        for x0, y0, x1, y1 in (a, b):
            outside_boxes[y0:y1, x0:x1] = False
        background = np.asarray(image)[outside_boxes]
        assert (background == background[0]).all() and tuple(background[0]) in (GREY, GREEN)
        assert "olis toy" in caption and "hta dog" in caption and caption.startswith("a photo of ")


def test_seg_mix_keeps_the_subject_shape_and_drops_its_original_background():
    """The disc arrives round (its box corners are background), and no grey/green from the references'
    surroundings leaks into the subjects' boxes except as the chosen plain background."""
    image, _ = mudi.seg_mix(
        [disc_subject(), square_subject()],
        np.random.default_rng(3),
        resolution=128,
        background=(255, 255, 255),
    )
    pixels = np.asarray(image)
    x0, y0, _, _ = box_of(pixels_of(image, RED))
    assert tuple(pixels[y0, x0]) == (255, 255, 255)  # the disc's corner is background, not red
    assert not pixels_of(image, GREY).any() and not pixels_of(image, GREEN).any()


def test_seg_mix_is_deterministic_for_a_seed_and_varies_across_seeds():
    subjects = [disc_subject(), square_subject()]
    draws = [mudi.seg_mix(subjects, np.random.default_rng(seed), resolution=64) for seed in (7, 7, 8)]
    assert np.array_equal(np.asarray(draws[0][0]), np.asarray(draws[1][0])) and draws[0][1] == draws[1][1]
    layouts = {
        np.asarray(mudi.seg_mix(subjects, np.random.default_rng(s), resolution=64)[0]).tobytes()
        for s in range(6)
    }
    captions = {mudi.seg_mix(subjects, np.random.default_rng(s), resolution=64)[1] for s in range(12)}
    assert len(layouts) == 6 and len(captions) == 2  # random layouts, both caption orders


def test_seg_mix_keeps_tiny_subjects_visible():
    """A 4-px subject in a 32-px reference still covers at least MIN_SUBJECT_PX on its short side."""
    tiny = disc_subject()
    image, mask = Image.new("RGB", (32, 32), GREY), Image.new("L", (32, 32), 0)
    ImageDraw.Draw(image).rectangle((10, 10, 13, 13), fill=RED)
    ImageDraw.Draw(mask).rectangle((10, 10, 13, 13), fill=255)
    tiny.images, tiny.masks = [image], [mask]
    for seed in range(5):
        composed, _ = mudi.seg_mix([tiny, square_subject()], np.random.default_rng(seed), resolution=32)
        x0, y0, x1, y1 = box_of(pixels_of(composed, RED))
        assert min(x1 - x0, y1 - y0) >= mudi.MIN_SUBJECT_PX


def test_seg_mix_errors_teach():
    with pytest.raises(SubjectError, match="could not place 2 subjects.*larger resolution"):
        mudi.seg_mix([disc_subject(), square_subject()], np.random.default_rng(0), resolution=6)
    unmasked = square_subject()
    unmasked.masks = [None]
    with pytest.raises(SubjectError, match="'hta dog' has images without one.*segmentation checkpoint"):
        mudi.seg_mix([disc_subject(), unmasked], np.random.default_rng(0), resolution=32)
    with pytest.raises(SubjectError, match="two or more subjects"):
        mudi.seg_mix([disc_subject()], np.random.default_rng(0), resolution=32)
    empty = disc_subject()
    empty.masks = [Image.new("L", (32, 32), 0)]
    with pytest.raises(SubjectError, match="mask of image 0 is empty"):
        mudi.seg_mix([empty, square_subject()], np.random.default_rng(0), resolution=32)


def test_cut_mix_puts_both_whole_images_side_by_side():
    subjects = [disc_subject(), square_subject()]
    image, caption = mudi.cut_mix(subjects, np.random.default_rng(0), resolution=64)
    assert image.size == (64, 64)
    assert pixels_of(image, RED).sum() > 20 and pixels_of(image, BLUE).sum() > 20
    assert pixels_of(image, GREY).any() and pixels_of(image, GREEN).any()  # backgrounds kept: no masks
    assert "olis toy" in caption and "hta dog" in caption
    # Each half holds one subject's image.
    halves = [np.asarray(image)[:, :32], np.asarray(image)[:, 32:]]
    has_red = [np.all(half == RED, axis=-1).any() for half in halves]
    has_blue = [np.all(half == BLUE, axis=-1).any() for half in halves]
    assert has_red != has_blue and sorted(has_red) == [False, True]
    # No masks needed.
    unmasked = square_subject()
    unmasked.masks = []
    mudi.cut_mix([disc_subject(), unmasked], np.random.default_rng(0), resolution=32)


def test_mean_shift_with_gamma_zero_is_initial_latents(tiny_pipe):
    subjects = [disc_subject(), square_subject()]
    shifted = mudi.mean_shifted_latents(
        tiny_pipe, subjects, gamma=0.0, generator=torch.Generator().manual_seed(3)
    )
    plain = initial_latents(tiny_pipe, 1, torch.Generator().manual_seed(3))
    assert shifted.shape == (1, 4, 16, 16) and torch.equal(shifted, plain)


def test_mean_shift_moves_the_latent_toward_the_composition(tiny_pipe):
    subjects = [disc_subject(), square_subject()]
    noise = initial_latents(tiny_pipe, 1, torch.Generator().manual_seed(5))
    cosines = []
    for gamma in (0.5, 1.0, 2.0, 4.0):
        latent = mudi.mean_shifted_latents(
            tiny_pipe, subjects, gamma=gamma, generator=torch.Generator().manual_seed(5)
        )
        shift = (latent - noise) / gamma  # the same layout for every γ: the seed fixes it
        cosines.append(F.cosine_similarity(latent.flatten(), shift.flatten(), dim=0).item())
        # The shift is the centred latent of a Seg-Mix composition drawn from the same generator.
        assert shift.mean(dim=(2, 3)).abs().max() < 1e-4 and shift.abs().max() > 0
    baseline = F.cosine_similarity(noise.flatten(), shift.flatten(), dim=0).item()  # γ = 0
    assert all(a < b for a, b in itertools.pairwise([baseline, *cosines]))
    # The layout is the composition's: re-derive it from the generator's state after the noise.
    generator = torch.Generator().manual_seed(5)
    initial_latents(tiny_pipe, 1, generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    composition, _ = mudi.seg_mix(subjects, np.random.default_rng(seed), resolution=32)
    expected = mudi.composition_latent(tiny_pipe, composition)
    expected = expected - expected.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(shift, expected, atol=1e-5)


def test_mean_shift_at_another_resolution(tiny_pipe):
    latent = mudi.mean_shifted_latents(
        tiny_pipe,
        [disc_subject(), square_subject()],
        gamma=1.0,
        generator=torch.Generator().manual_seed(0),
        resolution=64,
    )
    assert latent.shape == (1, 4, 32, 32)
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 2"):
        mudi.mean_shifted_latents(
            tiny_pipe, [disc_subject()], gamma=1.0, generator=torch.Generator(), resolution=33
        )


def test_masks_from_tiny_random_clipseg_are_binary_and_image_sized():
    images = [disc_subject().images[0], Image.new("RGB", (48, 20), BLUE)]
    masks = mudi.masks_from_model(images, "toy", checkpoint="tiny-random")
    assert [mask.size for mask in masks] == [(32, 32), (48, 20)] and all(mask.mode == "L" for mask in masks)
    values = set(np.unique(np.concatenate([np.asarray(mask).ravel() for mask in masks])).tolist())
    assert values <= {0, 255}
    # A threshold below every probability marks everything: the threshold is applied, not ignored.
    assert all(
        np.asarray(m).min() == 255
        for m in mudi.masks_from_model(images, "toy", checkpoint="tiny-random", threshold=0.0)
    )
    # Seeded: the same masks twice; batch of one (transformers squeezes it) works too.
    again = mudi.masks_from_model(images[:1], "toy", checkpoint="tiny-random")
    assert np.array_equal(np.asarray(again[0]), np.asarray(masks[0]))


def test_ensure_masks_fills_only_missing_masks_and_keeps_the_user_s():
    user = square_subject()
    partial = disc_subject()
    partial.images.append(partial.images[0].copy())
    partial.masks = [partial.masks[0]]  # the second image has no mask
    filled = mudi.ensure_masks([partial, user], checkpoint="tiny-random")
    assert filled[0].masks[0] is partial.masks[0] and filled[0].masks[1].size == (32, 32)
    assert filled[1].masks == user.masks
    assert len(partial.masks) == 1  # inputs untouched
    assert set(np.unique(np.asarray(filled[0].masks[1])).tolist()) <= {0, 255}


def test_missing_masks_and_checkpoint_errors_teach(tmp_path):
    unmasked = disc_subject()
    unmasked.masks = [None]
    with pytest.raises(SubjectError, match="'olis toy' has reference images without masks.*NAME.mask.png"):
        mudi.ensure_masks([unmasked, square_subject()], checkpoint=None)
    assert mudi.ensure_masks([disc_subject(), square_subject()], checkpoint=None)[0].masks[0] is not None
    with pytest.raises(mudi.MissingSegmenterError, match="(?s)never downloads.*hf download CIDAS/clipseg"):
        mudi.masks_from_model(unmasked.images, "toy", checkpoint=str(tmp_path / "no-clipseg"))
