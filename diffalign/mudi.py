"""MuDI's augmentations and initialisation (Jang, Jo, Lee and Hwang, "Identity Decoupling for
Multi-Subject Personalization of Text-to-Image Models", NeurIPS 2024, arXiv 2404.04243).

A DreamBooth model fine-tuned on two subjects tends to *mix* them: a generated "olis toy and hta
dog" carries the toy's colours on the dog. MuDI decouples the identities with segmented subjects:

* **Seg-Mix** (training augmentation, :func:`seg_mix`). With probability ``p`` a training example is
  replaced by a composition: each subject cut out along its mask, rescaled by a random factor and
  pasted at a random position on a plain background, captioned with every subject's identifier.
  The model sees each identity next to the other with no background or overlap to blur them, so
  it learns them apart. The official training script uses ``p = 0.3`` in its example
  (:data:`SEGMIX_PROB`).
* **Mean-shifted initialisation** (inference, :func:`mean_shifted_latents`). The sampler starts from
  Gaussian noise whose mean is moved toward the VAE latent of the subjects composed in a random
  layout, which tells the model from step one where each subject goes, so neither goes missing nor
  takes over the other's place.
* **Cut-Mix** (:func:`cut_mix`), the baseline MuDI compares against (Cut-Mix augmentation for
  multi-subject DreamBooth, as in SVDiff, Han et al. 2023): rectangular crops of whole images side by
  side, no segmentation. Backgrounds stay, and the seam between crops is learnt as part of the scene.

The formulas and constants used here (``R`` = resolution, ``N`` = number of subjects):

Seg-Mix scale. Subject i is cropped to its mask's bounding box ``w_i × h_i`` and rescaled by
``s_i = u_i · min(0.9 R / (N w_i), 0.9 R / h_i)`` with ``u_i ~ U(0.75, 1)``: at most 90 % of its
share of the width and of the height. The ``U(0.75, 1)`` range of the largest fitting size is the
official code's; the share is ``R/N`` rather than its fixed half width so that N > 2 works, and the
10 % slack (official: a 32-px margin at 1024 px, 3 %) leaves room for random non-overlapping positions.
The shorter side is kept at least :data:`MIN_SUBJECT_PX` pixels (4), so 32-px ShapesWorld subjects
stay recognisable; only that minimum can take a subject past its share.

Seg-Mix placement. Top-left corners are drawn uniformly over the canvas and the whole layout
(scales and positions) is redrawn until the subjects' boxes are pairwise disjoint, up to
:data:`PLACEMENT_TRIES` (1000) times; then the error says the subjects cannot fit. Deviation: the
official code pins one subject to the left edge and one to the right and lets their boxes overlap
(the later one occludes); we keep them disjoint, as occlusion would hide part of an identity the
composition exists to show whole, and 2-D positions also give vertical and diagonal layouts.

Seg-Mix background and caption. The paper composes on white; here the default is the per-channel
median colour of all the references' unmasked pixels (white when every pixel is masked), so the
composition's background is one the references already have and is not a new cue to learn; pass
``background=(255, 255, 255)`` for the paper's choice. The caption is
``"a photo of {token_1} and {token_2}"`` in random order (official: "a photo of a {} and a {}, simple
background."; the trainer's prompt template owns the wording beyond naming every subject).

Mean-shifted initialisation. With ``ε ~ N(0, I)`` drawn exactly as the model family's ``initial_latents``
draws it, ``σ`` the scheduler's ``init_noise_sigma`` (1 for a rectified flow, whose x_1 is ε), ``μ = scaling_factor · (E(x_mix) − shift_factor)``
the VAE posterior mean of a Seg-Mix composition ``x_mix`` and ``m`` its per-channel spatial mean::

    z_T = σ ε + γ (μ − m)

``γ = 0`` gives ``initial_latents`` exactly. The paper's own statement of the formula and of its γ
could not be retrieved offline (the official repository's inference notebook is not among the sources
available here), so this is our form: the shift is *centred* per channel because what carries the
layout is where the subjects differ from the background; a global per-channel offset would only tint
the whole image and move the noise off the statistics the scheduler assumes. The default
:data:`DEFAULT_GAMMA` = 0.1 comes from the noise schedule: the forward process at the first sampled
step t holds the clean latent at scale √ᾱ_t, 0.09 at t = 951 (DDIM, 20 steps, SD's scaled-linear
betas, which ShapesWorld's pipeline shares), so γ ≈ 0.1 puts the layout where a real image of it
would be; γ = 1 is ten times more, and the sampler then redraws the blurred composition itself.
On ShapesWorld (docs/studies/mudi.md) γ = 0.1 neither helped nor hurt multi-subject success
within the seeds' spread; tune it per model.

Masks come from the user (``NAME.mask.png``) or, through :func:`ensure_masks`, from a text-prompted
segmentation model (CLIPSeg, Lüddecke and Ecker 2022, via ``transformers``) prompted with the class
word. The paper uses SAM with OWLv2 boxes; CLIPSeg is one small model doing both from text, which is
why it is the one here. ``checkpoint="tiny-random"`` builds a tiny random CLIPSeg for tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from diffalign import families
from diffalign.errors import DiffalignError
from diffalign.subjects import SubjectError, SubjectImages

SEGMIX_PROB = 0.3  # probability an example is a Seg-Mix composition (the official README's example)
DEFAULT_GAMMA = 0.1  # strength of the mean shift; ours, from the noise schedule (module docstring)
SCALE_RANGE = (0.75, 1.0)  # fraction of the largest fitting size a subject is drawn at (official code)
SHARE_FILL = 0.9  # a subject fills at most this much of its share, leaving room to place them apart
MIN_SUBJECT_PX = 4  # shortest side of a placed subject: smaller and a 32-px subject is a dot
PLACEMENT_TRIES = 1000  # layouts drawn before giving up; two subjects are disjoint in >= ~3 % of draws
MASK_THRESHOLD = 128  # mask pixels >= this are the subject (masks are 0/255, soft edges split in half)
CLIPSEG_ID = "CIDAS/clipseg-rd64-refined"
TINY_RANDOM = "tiny-random"
TINY_IMAGE_SIZE = 32
WHITE = (255, 255, 255)
# CLIP's image statistics: CLIPSeg's vision tower is CLIP's.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Color = tuple[int, int, int]


class MissingSegmenterError(DiffalignError):
    """A segmentation checkpoint is not on this machine; the message says how to get it."""


@dataclass
class _Cutout:
    """One subject cut along its mask: its bounding-box crop (outside the mask = background)."""

    token: str
    image: Image.Image  # RGB, w × h
    mask: Image.Image  # "L", 0/255, w × h


# --------------------------------------------------------------------------------------------- Seg-Mix


def seg_mix(
    subjects: Sequence[SubjectImages],
    rng: np.random.Generator,
    *,
    resolution: int,
    background: Color | None = None,
) -> tuple[Image.Image, str]:
    """A ``resolution``² Seg-Mix composition of one random image of each subject, and its caption.

    Each subject is cropped to its mask's bounding box (pixels outside the mask become the
    background), rescaled by a random factor and pasted at a random position, boxes disjoint, on a
    plain ``background`` (default: the median colour of the references' unmasked pixels). The caption
    names every subject's token in a random order. All randomness comes from ``rng``.
    """
    _check_composable(subjects, resolution, "Seg-Mix")
    missing = [item.subject.token for item in subjects if not _has_all_masks(item)]
    if missing:
        raise SubjectError(
            f"Seg-Mix needs a mask for every reference image, and {_names(missing)} "
            f"{'has' if len(missing) == 1 else 'have'} images without one. Give masks (NAME.mask.png "
            "beside NAME.png, white = the subject) or a segmentation checkpoint so diffalign.mudi."
            "ensure_masks can make them; or train with Cut-Mix, which needs no masks."
        )
    color = background if background is not None else median_background(subjects)
    cutouts = []
    for item in subjects:
        index = int(rng.integers(len(item.images)))
        cutouts.append(_cut_out(item, index, color))
    canvas = Image.new("RGB", (resolution, resolution), color)
    for cutout, (x, y) in zip(cutouts, _layout(cutouts, rng, resolution), strict=True):
        canvas.paste(cutout.image, (x, y), cutout.mask)
    return canvas, _caption([cutout.token for cutout in cutouts], rng)


def median_background(subjects: Sequence[SubjectImages]) -> Color:
    """The per-channel median colour of all the references' unmasked pixels (white if there are none).

    A colour the references already show, so the plain background of a composition does not teach
    the model a new backdrop to associate with the identifiers.
    """
    pixels = []
    for item in subjects:
        for image, mask in zip(item.images, item.masks, strict=False):
            if mask is None:
                continue
            outside = np.asarray(mask.convert("L")) < MASK_THRESHOLD
            pixels.append(np.asarray(image.convert("RGB"))[outside])
    pixels = np.concatenate(pixels) if pixels else np.zeros((0, 3), np.uint8)
    if len(pixels) == 0:
        return WHITE
    return tuple(int(v) for v in np.median(pixels, axis=0))


def _cut_out(item: SubjectImages, index: int, background: Color) -> _Cutout:
    image, mask = item.images[index].convert("RGB"), item.masks[index].convert("L")
    if image.size != mask.size:
        raise SubjectError(
            f"subject {item.subject.token!r}: image {index} is {image.size[0]}×{image.size[1]} but its mask "
            f"is {mask.size[0]}×{mask.size[1]}; a mask must have its image's size"
        )
    inside = np.asarray(mask) >= MASK_THRESHOLD
    if not inside.any():
        raise SubjectError(
            f"subject {item.subject.token!r}: the mask of image {index} is empty (no pixel >= "
            f"{MASK_THRESHOLD}); white marks the subject, so an all-black mask hides it. Redraw the mask."
        )
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    pixels = np.asarray(image).copy()
    pixels[~inside] = background
    binary = Image.fromarray(np.where(inside, 255, 0).astype(np.uint8), "L")
    return _Cutout(item.subject.token, Image.fromarray(pixels).crop(box), binary.crop(box))


def _layout(cutouts: list[_Cutout], rng: np.random.Generator, resolution: int) -> list[tuple[int, int]]:
    """Rescale the cutouts (in place) and return disjoint top-left corners, by rejection sampling."""
    share = SHARE_FILL * resolution / len(cutouts)
    sizes = [cutout.image.size for cutout in cutouts]
    for _ in range(PLACEMENT_TRIES):
        scaled = [_draw_size(w, h, share, SHARE_FILL * resolution, rng) for w, h in sizes]
        if any(w > resolution or h > resolution for w, h in scaled):
            break  # the minimum size alone exceeds the canvas: no draw can succeed
        corners = [
            (int(rng.integers(resolution - w + 1)), int(rng.integers(resolution - h + 1))) for w, h in scaled
        ]
        boxes = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(corners, scaled, strict=True)]
        if all(_disjoint(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]):
            for cutout, size in zip(cutouts, scaled, strict=True):
                cutout.image = cutout.image.resize(size, Image.Resampling.BILINEAR)
                # Nearest keeps the mask binary, so pasted pixels are the subject's, never a blend.
                cutout.mask = cutout.mask.resize(size, Image.Resampling.NEAREST)
            return corners
    raise SubjectError(
        f"Seg-Mix could not place {len(cutouts)} subjects without overlap on a {resolution}×{resolution} "
        f"canvas in {PLACEMENT_TRIES} random layouts (each subject is kept at least {MIN_SUBJECT_PX} px "
        "on its shorter side). Use a larger resolution or fewer subjects per composition."
    )


def _draw_size(w: int, h: int, share_w: float, share_h: float, rng: np.random.Generator) -> tuple[int, int]:
    largest = min(share_w / w, share_h / h)
    factor = max(rng.uniform(*SCALE_RANGE) * largest, MIN_SUBJECT_PX / min(w, h))
    return max(1, round(w * factor)), max(1, round(h * factor))


def _disjoint(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


# --------------------------------------------------------------------------------------------- Cut-Mix


def cut_mix(
    subjects: Sequence[SubjectImages],
    rng: np.random.Generator,
    *,
    resolution: int,
    background: Color | None = None,
) -> tuple[Image.Image, str]:
    """A ``resolution``² Cut-Mix composition: one random image of each subject in its own vertical strip.

    The subjects take the strips in a random order; each image is scaled to the canvas height and a
    strip-wide window is cut from it at a random horizontal offset (an image narrower than its strip is
    centred on ``background``, default: the median colour of the images' borders). No masks: the
    baseline MuDI's Seg-Mix improves on, since the references' backgrounds and the seam stay in.
    """
    _check_composable(subjects, resolution, "Cut-Mix")
    images = [(item.subject.token, item.images[int(rng.integers(len(item.images)))]) for item in subjects]
    order = rng.permutation(len(images))
    color = background if background is not None else _border_median([image for _, image in images])
    canvas = Image.new("RGB", (resolution, resolution), color)
    edges = np.linspace(0, resolution, len(images) + 1).round().astype(int)
    for slot, index in enumerate(order):
        left, width = int(edges[slot]), int(edges[slot + 1] - edges[slot])
        image = images[index][1].convert("RGB")
        scaled_w = max(1, round(image.width * resolution / image.height))
        image = image.resize((scaled_w, resolution), Image.Resampling.BILINEAR)
        if scaled_w >= width:
            offset = int(rng.integers(scaled_w - width + 1))
            canvas.paste(image.crop((offset, 0, offset + width, resolution)), (left, 0))
        else:
            canvas.paste(image, (left + (width - scaled_w) // 2, 0))
    return canvas, _caption([token for token, _ in images], rng)


def _border_median(images: list[Image.Image]) -> Color:
    borders = []
    for image in images:
        pixels = np.asarray(image.convert("RGB"))
        borders += [pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]
    return tuple(int(v) for v in np.median(np.concatenate(borders), axis=0))


# ------------------------------------------------------------------------------------ shared helpers


def _check_composable(subjects: Sequence[SubjectImages], resolution: int, what: str) -> None:
    if len(subjects) < 2:
        raise SubjectError(
            f"{what} composes two or more subjects, got {len(subjects)}; a single subject is trained "
            "on its own images"
        )
    if resolution < 1:
        raise SubjectError(f"{what}: resolution must be a positive number of pixels, got {resolution}")
    for item in subjects:
        if not item.images:
            raise SubjectError(f"subject {item.subject.token!r} has no images; give it at least one")


def _has_all_masks(item: SubjectImages) -> bool:
    return len(item.masks) == len(item.images) and all(mask is not None for mask in item.masks)


def _caption(tokens: list[str], rng: np.random.Generator) -> str:
    """``"a photo of A and B"`` (``"A, B and C"`` for three), tokens in random order."""
    shuffled = [tokens[i] for i in rng.permutation(len(tokens))]
    return f"a photo of {', '.join(shuffled[:-1])} and {shuffled[-1]}"


def _names(tokens: list[str]) -> str:
    return ", ".join(repr(token) for token in tokens)


# ------------------------------------------------------------------------- mean-shifted initialisation


@torch.no_grad()
def mean_shifted_latents(
    pipe: StableDiffusionPipeline,
    subjects: Sequence[SubjectImages],
    *,
    gamma: float,
    generator: torch.Generator,
    resolution: int | None = None,
) -> torch.Tensor:
    """MuDI's initial latent ``[1, C, h, w]``: ``z_T = σ ε + γ (μ − m)`` (module docstring).

    ``ε`` is drawn from ``generator`` first and exactly as the model family's ``initial_latents``
    draws it, so ``gamma=0`` returns that tensor and a seed means the same noise with or without the
    shift. The layout of the Seg-Mix composition behind ``μ`` is then drawn from the same generator.
    ``resolution`` defaults to the pipeline's native image size.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0 (0 = plain Gaussian noise), got {gamma}")
    down = pipe.vae_scale_factor
    family = families.of(pipe)
    denoiser = families.denoiser(pipe)
    native = denoiser.config.sample_size
    resolution = native * down if resolution is None else resolution
    if resolution % down:
        raise ValueError(
            f"resolution {resolution} is not a multiple of the VAE's downsampling factor {down}; "
            f"use e.g. {resolution // down * down or down}"
        )
    if resolution // down == native:
        noise = family.initial_latents(pipe, 1, generator)  # [1, C, h, w]
    else:
        shape = (1, denoiser.config.in_channels, resolution // down, resolution // down)
        noise = randn_tensor(shape, generator=generator, device=denoiser.device, dtype=denoiser.dtype)
        # DDPM-style schedulers scale x_T; a flow's x_1 is the unit Gaussian itself.
        noise = noise * getattr(pipe.scheduler, "init_noise_sigma", 1.0)
    if gamma == 0:
        return noise
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    composition, _ = seg_mix(subjects, np.random.default_rng(seed), resolution=resolution)
    shift = composition_latent(pipe, composition)
    shift = shift - shift.mean(dim=(2, 3), keepdim=True)
    return noise + gamma * shift.to(dtype=noise.dtype, device=noise.device)


@torch.no_grad()
def composition_latent(pipe: StableDiffusionPipeline, image: Image.Image) -> torch.Tensor:
    """``[1, C, h, w]``: the VAE's posterior mean of ``image``, in the scaled space the denoiser (UNet or flow transformer) reads.

    The posterior mean rather than a sample: the noise is already ε's job, and a sample would draw
    from a generator the caller does not see.
    """
    vae = pipe.vae
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
    pixels = pixels.permute(2, 0, 1).unsqueeze(0).to(device=vae.device, dtype=vae.dtype)  # [1, 3, H, W]
    mean = vae.encode(pixels).latent_dist.mean.float()  # [1, C, h, w]
    shift_factor = getattr(vae.config, "shift_factor", None) or 0.0
    return (mean - shift_factor) * vae.config.scaling_factor


# ------------------------------------------------------------------------------------------- masks


def ensure_masks(
    subjects: Sequence[SubjectImages],
    *,
    checkpoint: str | None,
    threshold: float = 0.5,
    device: str = "cpu",
) -> list[SubjectImages]:
    """The subjects with every missing mask made by the segmentation model at ``checkpoint``.

    User masks are kept as given; only images without one are segmented, prompted with their
    subject's class word. The segmenter loads once, and only if a mask is missing. Without a
    checkpoint and with masks missing, the error names the subjects and both ways to fix it.
    The inputs are not modified.
    """
    needs = [item for item in subjects if not _has_all_masks(item)]
    if not needs:
        return [SubjectImages(item.subject, list(item.images), list(item.masks)) for item in subjects]
    if checkpoint is None:
        raise SubjectError(
            f"{_names([item.subject.token for item in needs])} "
            f"{'has' if len(needs) == 1 else 'have'} reference images without masks, and no segmentation "
            "checkpoint was given to make them. Either give masks (NAME.mask.png beside NAME.png, white = "
            f"the subject) or a CLIPSeg checkpoint (a local folder or cached hub id such as {CLIPSEG_ID!r}) "
            "to segment each image by its class word."
        )
    model, processor = load_segmenter(checkpoint, device=device)
    completed = []
    for item in subjects:
        masks = list(item.masks) + [None] * (len(item.images) - len(item.masks))
        todo = [i for i, mask in enumerate(masks) if mask is None]
        if todo:
            made = _segment(
                model, processor, [item.images[i] for i in todo], item.subject.class_word, threshold
            )
            for i, mask in zip(todo, made, strict=True):
                masks[i] = mask
        completed.append(SubjectImages(item.subject, list(item.images), masks))
    return completed


def masks_from_model(
    images: list[Image.Image],
    class_word: str,
    *,
    checkpoint: str,
    threshold: float = 0.5,
    device: str = "cpu",
) -> list[Image.Image]:
    """One mask per image ("L", the image's size, 0 or 255): where CLIPSeg, prompted with
    ``class_word``, gives the subject a probability above ``threshold``.

    ``checkpoint`` is a local folder or cached hub id of a ``CLIPSegForImageSegmentation`` with its
    processor, or ``"tiny-random"`` for a seeded tiny random one (tests). Weights are never downloaded.
    """
    model, processor = load_segmenter(checkpoint, device=device)
    return _segment(model, processor, images, class_word, threshold)


def load_segmenter(checkpoint: str, *, device: str = "cpu"):
    """``(CLIPSegForImageSegmentation, CLIPSegProcessor)`` from local files, or the tiny random pair."""
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    if checkpoint == TINY_RANDOM:
        model, processor = tiny_clipseg()
    else:
        try:
            processor = CLIPSegProcessor.from_pretrained(checkpoint, local_files_only=True)
            model = CLIPSegForImageSegmentation.from_pretrained(checkpoint, local_files_only=True)
        except (OSError, ValueError) as error:  # ValueError: a path that is not a hub id either
            raise MissingSegmenterError(
                f"the segmentation checkpoint {checkpoint!r} is not a local folder or in the Hugging Face "
                "cache (diffalign reads local files only and never downloads weights). To provide it:\n"
                f"  1. on a machine with internet run:  hf download {CLIPSEG_ID}\n"
                "  2. bring the result here: keep it in the Hugging Face cache (copy the cache folder, or "
                "set HF_HOME), or pass the folder as the checkpoint\n"
                "Or give masks yourself (NAME.mask.png beside NAME.png, white = the subject); for tests, "
                f"checkpoint={TINY_RANDOM!r} builds a tiny random CLIPSeg."
            ) from error
    return model.eval().requires_grad_(False).to(device), processor


@torch.no_grad()
def _segment(model, processor, images: list[Image.Image], class_word: str, threshold: float) -> list:
    if not images:
        return []
    rgb = [image.convert("RGB") for image in images]
    inputs = processor(text=[class_word] * len(rgb), images=rgb, padding=True, return_tensors="pt")
    inputs = inputs.to(model.device)
    logits = model(**inputs).logits.float()
    logits = logits.reshape(len(rgb), 1, *logits.shape[-2:])  # [B, 1, h, w]; transformers squeezes B = 1
    probabilities = torch.sigmoid(logits).cpu()
    masks = []
    for image, probability in zip(rgb, probabilities, strict=True):
        # Resize the probabilities, not the binary mask, so the edge follows the model, not the pixel grid.
        full = torch.nn.functional.interpolate(
            probability[None], size=(image.height, image.width), mode="bilinear", align_corners=False
        )[0, 0]
        masks.append(Image.fromarray(np.where(full.numpy() > threshold, 255, 0).astype(np.uint8), "L"))
    return masks


def tiny_clipseg():
    """A seeded tiny random ``CLIPSegForImageSegmentation`` (32-px images) and a matching processor.

    The same classes as ``CIDAS/clipseg-rd64-refined`` with the real CLIP tokenizer, scaled down so a
    test runs the real segmentation path in milliseconds; its masks are random, not meaningful.
    """
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    from diffalign.rewards.checkpoints import seeded
    from diffalign.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    config = CLIPSegConfig(
        text_config={
            "vocab_size": tokenizer.vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
        },
        projection_dim=32,
        reduce_dim=16,
        extract_layers=[0, 1, 2],  # one per vision layer: the decoder reads every layer it is given
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    with seeded():
        model = CLIPSegForImageSegmentation(config)
    image_processor = ViTImageProcessor(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    return model, CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)
