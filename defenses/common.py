"""What every protection in ``diffalign.defenses`` shares: input checks, masked L∞ PGD, mask augmentation.

Conventions, the same for every method:

- Images are ``[3, H, W]`` floats in [0, 1]. The budget and the step size are in the same
  [0, 1] pixel units: ``budget=8/255`` lets every protected pixel move by at most 8 grey
  levels of an 8-bit image. (Reference code often works on images rescaled to [-1, 1],
  where the same perturbation is twice as large: DiffusionGuard's ``eps = 16/255`` there is
  8/255 here, and its step 1/255 is 0.5/255 here.)
- The *protected mask* is ``[1, H, W]``, 1 on the region the owner protects. It is the
  region an inpainting attacker keeps (``keep_mask`` in ``diffalign.inpainting``) and the
  complement of diffusers' ``mask_image``. Masks are binarised at 0.5, as diffusers does.
- The perturbation is exactly zero outside the protected region, within ±budget inside it,
  and the protected image stays in [0, 1].

The optimiser is projected gradient ascent with sign steps (Madry et al., ICLR 2018), the
one every method here and its reference code use; each method contributes the objective.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

from diffalign.errors import DiffalignError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

# (step done, total steps, objective value at that step) -> None; raise to cancel.
ProgressCallback = Callable[[int, int, float], None]
# (adversarial image [1, 3, H, W] in [0, 1], this step's protected mask [1, 1, H, W]) -> scalar to maximise.
Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ProtectionError(DiffalignError, ValueError):
    """The image, mask or settings given to a protection cannot be used."""


@dataclass
class ProtectionResult:
    """A protected image and what it cost to make."""

    method: str
    image: torch.Tensor  # [3, H, W] in [0, 1]: the protected image
    perturbation: torch.Tensor  # [3, H, W]: protected image - original; zero outside the protected region
    mask: torch.Tensor  # [1, H, W] binary: the protected region used (after resizing and binarising)
    objective: list[float]  # the maximised objective at each PGD step (each method documents its sign)
    unet_calls: int  # UNet forward passes (a batched call counts once)
    vae_calls: int  # VAE encoder + decoder forward passes
    seconds: float  # wall time, including the one-off text encoding and target computations


@dataclass(frozen=True)
class MaskAugmentation:
    """DiffusionGuard's mask augmentation: a random shrinking of the protected region, redrawn every PGD step.

    The attacker's mask will not be the one the defender drew; training the noise against
    masks whose contour is pulled inwards by a random, smooth, position-dependent depth makes
    it work for those too. An augmented mask is always a non-empty subset of the original.
    Our parametrisation, not the reference code's (which jitters polygon vertices with OpenCV);
    lengths are relative to R, the radius of a disc with the region's area, so one setting
    fits any image size.
    """

    strength: float = 0.5
    """Deepest inward move of the contour, as a fraction of R. Each draw picks a depth in [0, strength·R]."""
    iterations: int = 15
    """Most jitter rounds per draw. Each draw picks 1..iterations rounds (at most one per pixel of depth),
    each moving the contour by its share of the depth: more rounds, rougher contours at the same depth."""
    smoothness: float = 0.1
    """Correlation length of the random depth field, as a fraction of R (0: independent per pixel)."""

    def __post_init__(self) -> None:
        if self.strength < 0:
            raise ProtectionError(
                f"MaskAugmentation.strength must be ≥ 0 (a fraction of its radius), got {self.strength}"
            )
        if self.iterations < 1:
            raise ProtectionError(f"MaskAugmentation.iterations must be ≥ 1, got {self.iterations}")
        if self.smoothness < 0:
            raise ProtectionError(f"MaskAugmentation.smoothness must be ≥ 0, got {self.smoothness}")


def augment_mask(
    protected: torch.Tensor, augmentation: MaskAugmentation | None, generator: torch.Generator
) -> torch.Tensor:
    """A random shrunken copy of ``protected  # [..., H, W]`` binary; unchanged if ``augmentation`` is None.

    Each round draws a smooth random depth field d(x) and removes the pixels whose distance
    to the unprotected area is at most d(x). The distance grows by one per dilation of the
    unprotected area with max-pooling, alternating 3×3 square and cross kernels (an
    octagonal approximation of the Euclidean distance). The image border does not count as
    unprotected, so a region touching the border is not eaten from there. A round that would
    remove everything is skipped.
    """
    if augmentation is None:
        return protected
    height, width = protected.shape[-2:]
    radius = math.sqrt(protected.sum().item() / math.pi)
    depth = _uniform((), generator).item() * augmentation.strength * radius
    rounds = torch.randint(1, augmentation.iterations + 1, (), generator=generator, device=generator.device)
    # Rounds moving the contour by less than a pixel each would remove nothing.
    rounds = max(1, min(int(rounds), int(depth)))
    cell = max(1.0, augmentation.smoothness * radius)  # pixels between independent depth values
    grid = (math.ceil(height / cell) + 1, math.ceil(width / cell) + 1)
    mask = protected.reshape(1, 1, height, width)
    for _ in range(rounds):
        field = _uniform(grid, generator).to(mask)[None, None]
        field = F.interpolate(field, size=(height, width), mode="bilinear", align_corners=True)
        shrunk = _erode(mask, field * depth / rounds)
        if shrunk.any():
            mask = shrunk
    return mask.reshape(protected.shape)


def _erode(mask: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """``mask  # [1, 1, H, W]`` minus the pixels within ``depth  # [1, 1, H, W]`` (pixels) of its outside."""
    outside = 1 - mask
    removed = torch.zeros_like(mask, dtype=torch.bool)
    for distance in range(1, int(depth.max().item()) + 1):
        if distance % 2:
            outside = F.max_pool2d(outside, 3, stride=1, padding=1)
        else:
            outside = torch.maximum(
                F.max_pool2d(outside, (1, 3), stride=1, padding=(0, 1)),
                F.max_pool2d(outside, (3, 1), stride=1, padding=(1, 0)),
            )
        removed |= (outside > 0) & (depth >= distance)
    return mask * ~removed


def _uniform(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device)


def seeded(generator: torch.Generator | None) -> torch.Generator:
    """The caller's generator, or a CPU generator with seed 0 so that a default run is reproducible."""
    return generator if generator is not None else torch.Generator().manual_seed(0)


def prepare_inputs(
    pipe: DiffusionPipeline,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    budget: float,
    step_size: float,
    steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check everything once.

    Returns ``(image  # [1, 3, H, W] fp32, protected  # [1, 1, H, W] binary)`` on the pipe's device.
    """
    if not 0 < budget <= 1:
        hint = f" If you meant {budget:g}/255, pass {budget / 255:.4f}." if budget > 1 else ""
        raise ProtectionError(
            f"budget is in [0, 1] pixel units (8/255 ≈ 0.0314) and must be in (0, 1]; got {budget}.{hint}"
        )
    if not 0 < step_size <= budget:
        raise ProtectionError(
            f"step_size must be in (0, budget={budget:.4f}] ([0, 1] pixel units); got {step_size}"
        )
    if steps < 1:
        raise ProtectionError(f"steps (PGD iterations) must be ≥ 1, got {steps}")
    if (
        not isinstance(image, torch.Tensor)
        or image.ndim != 3
        or image.shape[0] != 3
        or not image.is_floating_point()
    ):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ProtectionError(
            f"image must be a float tensor [3, H, W] in [0, 1]; got {shape}. "
            "Load files with diffalign.images.load_image; drop a batch dimension with image[0]."
        )
    if not torch.isfinite(image).all():
        raise ProtectionError(
            "image has NaN or infinite values; expected a float tensor [3, H, W] in [0, 1]."
        )
    low, high = image.min().item(), image.max().item()
    if low < 0 or high > 1:
        hint = " It looks like [-1, 1]: pass (image + 1) / 2." if low >= -1 and high <= 1 else ""
        hint = " It looks like [0, 255]: pass image / 255." if high > 1 and low >= 0 else hint
        raise ProtectionError(f"image values must be in [0, 1]; got [{low:.3g}, {high:.3g}].{hint}")
    height, width = image.shape[-2:]
    factor = pipe.vae_scale_factor
    if height % factor or width % factor:
        raise ProtectionError(
            f"image is {height}×{width}, but the model needs sides divisible by {factor} (VAE downsampling); "
            f"crop or resize to {height - height % factor}×{width - width % factor}."
        )
    if (
        not isinstance(mask, torch.Tensor)
        or mask.ndim not in (2, 3)
        or (mask.ndim == 3 and mask.shape[0] != 1)
    ):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ProtectionError(
            f"mask must be a tensor [1, H, W] (or [H, W]), 1 = protected region; got {shape}"
        )
    mask = mask.reshape(1, 1, *mask.shape[-2:]).float()
    if mask.shape[-2:] != image.shape[-2:]:
        warnings.warn(
            f"mask is {tuple(mask.shape[-2:])} but the image is {(height, width)}; resized it (nearest).",
            stacklevel=3,
        )
        mask = F.interpolate(mask, size=(height, width), mode="nearest")
    protected = (mask >= 0.5).float()
    if not protected.any():
        raise ProtectionError(
            "nothing to protect: the mask has no pixel ≥ 0.5. "
            "Set the region to protect (e.g. the face) to 1 and the rest to 0."
        )
    device = pipe.device
    return image[None].float().to(device), protected.to(device)


def pgd(
    objective: Objective,
    image: torch.Tensor,
    protected: torch.Tensor,
    *,
    budget: float,
    step_size: float,
    steps: int,
    augment: MaskAugmentation | None,
    generator: torch.Generator,
    progress: ProgressCallback | None,
) -> tuple[torch.Tensor, list[float]]:
    """Maximise ``objective`` over perturbations of the protected region; ``(delta  # like image, history)``.

    Each step: draw this step's mask (augmented or not), take the objective's gradient with
    respect to the image, move the pixels of that mask by ``step_size`` along its sign, and
    project onto the constraints (region, ±budget, [0, 1]).
    """
    delta = torch.zeros_like(image)
    history = []
    for step in range(steps):
        keep = augment_mask(protected, augment, generator)
        adversarial = (image + delta).requires_grad_(True)
        with torch.enable_grad():  # callers (pipelines, apps) often run under no_grad
            value = objective(adversarial, keep)
        (gradient,) = torch.autograd.grad(value, adversarial)
        delta = project(delta + step_size * gradient.sign() * keep, image, protected, budget)
        history.append(value.item())
        if progress is not None:
            progress(step + 1, steps, history[-1])
    return delta, history


def project(delta: torch.Tensor, image: torch.Tensor, protected: torch.Tensor, budget: float) -> torch.Tensor:
    """The feasible perturbation: zero outside ``protected``, within ±budget, ``image + delta`` in [0, 1]."""
    delta = delta.clamp(-budget, budget) * protected
    return (image + delta).clamp(0, 1) - image


class PassCounter:
    """Counts forward passes of the UNet and of the VAE's encoder and decoder, and wall time, with hooks.

    Hooks count what the models actually ran, whichever code path called them. Backward
    passes are not counted separately: each costs about two forwards of the same module.
    """

    def __init__(self, pipe: DiffusionPipeline) -> None:
        self._modules = {"unet": [pipe.unet], "vae": [pipe.vae.encoder, pipe.vae.decoder]}
        self.counts = {name: 0 for name in self._modules}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._start = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Self:
        for name, modules in self._modules.items():
            for module in modules:
                self._handles.append(module.register_forward_hook(self._counter(name)))
        self._start = time.perf_counter()
        return self

    def _counter(self, name: str) -> Callable[..., None]:
        def hook(*_) -> None:
            self.counts[name] += 1

        return hook

    def __exit__(self, *_) -> None:
        self.seconds = time.perf_counter() - self._start
        for handle in self._handles:
            handle.remove()

    def result(
        self,
        method: str,
        image: torch.Tensor,
        delta: torch.Tensor,
        protected: torch.Tensor,
        history: list[float],
    ) -> ProtectionResult:
        protected_image = (image + delta).clamp(0, 1)
        return ProtectionResult(
            method=method,
            image=protected_image[0].detach().cpu(),
            perturbation=(protected_image - image)[0].detach().cpu(),
            mask=protected[0].cpu(),
            objective=history,
            unet_calls=self.counts["unet"],
            vae_calls=self.counts["vae"],
            seconds=self.seconds,
        )


@contextmanager
def frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """``requires_grad_(False)`` on the modules' parameters for the block, restored afterwards.

    PGD needs gradients for the image only; frozen weights let autograd skip saving what
    weight gradients would need, which matters for a full-size UNet.
    """
    parameters = [p for module in modules for p in module.parameters()]
    flags = [p.requires_grad for p in parameters]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(parameters, flags, strict=True):
            parameter.requires_grad_(flag)
