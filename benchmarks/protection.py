"""How well do DiffusionGuard, PhotoGuard and AdvDM protect ShapesWorld images against inpainting edits?

The attacker keeps one object of a two-object scene and asks the shipped inpainting editor
(``shapes-inpaint``) to draw a different second object next to it; the defender perturbs
the kept object beforehand. Because the exact oracle scores every edit against its prompt,
"the edit succeeded" is measured, not estimated. For each method and budget the benchmark
reports, for the edits of protected images next to those of the same images unprotected
(same editor noise):

- **edit success**: the share of edits the oracle finds exactly right (the headline; a good
  protection lowers it), and the oracle's mean score;
- **kept in place** and **faithful success**: the share of edits in which the protected object
  is still where it was (same colour and shape, centre within ``KEPT_TOLERANCE``), and the share
  that are exactly right *and* keep it in place: the attacker wants *this* object in a new
  scene, which the prompt alone cannot give;
- **PSNR of the protected edit against the unprotected edit** (lower: the protection changed
  the edit more);
- **CLIP directional similarity** (Gal et al., 2022) with the ShapesWorld CLIP: the cosine
  between the image change (edit − original) and the text change (edit prompt − original
  prompt); lower: the edit follows the instruction less;
- **imperceptibility**: PSNR of the protected image against the original;
- **cost**: UNet and VAE passes and seconds per image, measured while protecting;
- **what the editor sees**: how far each protection moved the masked-image latents the editor
  reads (relative to the whole kept object's latents) and how much it raised the norm of the
  editor's noise prediction at the first timestep (DiffusionGuard's objective).

Edits are made under five conditions: the defender's own mask (*seen*); two *unseen* masks
the attacker drew differently (the object's bounding box grown by 1-2 px, and a hand-drawn
lasso around it); the protected image after JPEG re-compression (seen mask); and a second
editor the defence never saw (*transfer*: diffusers' blended inpainting around the
4-channel base model, seen mask).

Steps are set so that the three methods cost about the same wall time per image on
ShapesWorld (PhotoGuard's VAE-only step is ~4x cheaper than a UNet step); the measured
seconds are in the table, side by side.

    python -m diffalign.benchmarks.protection            # ~27 minutes on 2 CPU cores
    python -m diffalign.benchmarks.protection --quick    # smoke run, seconds

From Python: ``run(Settings(...))`` returns the dict written as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm.auto import tqdm

from diffalign import defenses, pipeline, plots
from diffalign.images import psnr as image_psnr
from diffalign.inpainting import encode_text, inpainting_condition, inpainting_unet, load_inpainting
from diffalign.shapes import detect, parse, render, scene_for, score
from diffalign.shapes.grammar import Facts, text
from diffalign.shapes.inpaint_training import blended_inpainting, object_regions
from diffalign.shapes.splits import prompts as split_prompts
from diffalign.shapes.world import Obj, Scene

METHODS = ("diffusionguard", "photoguard", "advdm")
CONDITIONS = ("seen", "unseen-box", "unseen-lasso", "jpeg", "transfer")
UNSEEN = ("unseen-box", "unseen-lasso")
# How far (fraction of the image side, ~2 px at 32) the kept object's centre may move in an edit
# and still count as kept in place; a redrawn object lands within 1 px of where it was.
KEPT_TOLERANCE = 0.07


@dataclass
class Settings:
    """One benchmark run. Budgets are in [0, 1] pixel units (8/255 is the papers' budget)."""

    scenes: int = 24
    edit_seeds: int = 2
    budgets: list[float] = field(default_factory=lambda: [8 / 255, 32 / 255])
    # PGD steps per method, for about equal seconds per image (see the module docstring)
    steps: dict[str, int] = field(
        default_factory=lambda: {"diffusionguard": 180, "photoguard": 800, "advdm": 150}
    )
    step_fraction: float = (
        1 / 16
    )  # PGD step size as a fraction of the budget (0.5/255 at 8/255, as in DiffusionGuard)
    editor_steps: int = 20  # the attacker's DDIM steps
    # the schedule DiffusionGuard assumes: it attacks that schedule's first timestep (None: the attacker's)
    guard_editor_steps: int | None = None
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    guidance: float = 5.0
    jpeg_quality: int = 75
    seed: int = 0


@dataclass
class Case:
    """A scene to protect and the edit an attacker wants to make of it."""

    image: torch.Tensor  # [3, H, W] in [0, 1]
    prompt: str  # what the scene shows
    edit_prompt: str  # the attacker's prompt: the kept object, a different second object, the same relation
    masks: dict[
        str, torch.Tensor
    ]  # "seen" (the defender's), "unseen-box", "unseen-lasso"; [1, H, W], 1 = kept
    kept: Obj  # the protected object, as the scene placed it


def _dilate(region: np.ndarray, pixels: int) -> np.ndarray:
    return ndimage.binary_dilation(region, iterations=pixels) if pixels else region


def box_mask(region: np.ndarray, margin: int) -> np.ndarray:
    """The bounding box of ``region  # [H, W] bool``, grown by ``margin`` pixels (clipped to the image)."""
    rows, columns = np.nonzero(region)
    mask = np.zeros_like(region)
    height, width = region.shape
    mask[
        max(rows.min() - margin, 0) : min(rows.max() + margin + 1, height),
        max(columns.min() - margin, 0) : min(columns.max() + margin + 1, width),
    ] = True
    return mask


def lasso_mask(region: np.ndarray, rng: np.random.Generator, vertices: int = 10) -> np.ndarray:
    """A hand-drawn-like loop around ``region``: a polygon around its centroid, with vertices at
    jittered, roughly even angles and radii of the region's reach times a random 1.0-1.3, so
    it is looser than the object in places and may clip its far corners."""
    rows, columns = np.nonzero(region)
    centre_y, centre_x = rows.mean(), columns.mean()
    reach = np.sqrt((rows - centre_y) ** 2 + (columns - centre_x) ** 2).max() + 0.5
    spacing = 2 * math.pi / vertices
    angles = np.arange(vertices) * spacing + rng.uniform(-0.3, 0.3, vertices) * spacing
    radii = reach * rng.uniform(1.0, 1.3, vertices)
    scale = 4  # draw supersampled, then keep pixels at least half covered
    points = [
        ((centre_x + 0.5 + r * math.cos(a)) * scale, (centre_y + 0.5 + r * math.sin(a)) * scale)
        for a, r in zip(angles, radii)
    ]
    canvas = Image.new("L", (region.shape[1] * scale, region.shape[0] * scale), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=255)
    return np.asarray(canvas.reduce(scale)) >= 128


def edit_prompt(facts: Facts, kept: int, rng: np.random.Generator, pool: list[Facts]) -> str:
    """The attacker's prompt: same relation and kept object, another train-split second object."""
    candidates = [
        other
        for other in pool
        if other.relations == facts.relations
        and other.entities[kept] == facts.entities[kept]
        and other.entities[1 - kept] != facts.entities[1 - kept]
    ]
    return text(candidates[rng.integers(len(candidates))])


def make_cases(count: int, seed: int = 0, size: int = 32) -> list[Case]:
    """``count`` train-split relation scenes, each with one object (at random) protected."""
    rng = np.random.default_rng(seed)
    pool = [parse(p) for p in split_prompts("train", "relation")]
    cases = []
    while len(cases) < count:
        facts = pool[rng.integers(len(pool))]
        scene = scene_for(facts, rng)
        kept = int(rng.integers(2))
        region = object_regions(render(Scene((scene.objects[kept],)), size)) > 0
        masks = {
            "seen": _dilate(region, 1),
            "unseen-box": box_mask(region, int(rng.integers(1, 3))),
            "unseen-lasso": lasso_mask(region, rng),
        }
        image = torch.from_numpy(np.array(render(scene, size))).permute(2, 0, 1).float() / 255
        cases.append(
            Case(
                image=image,
                prompt=text(facts),
                edit_prompt=edit_prompt(facts, kept, rng, pool),
                masks={name: torch.from_numpy(mask)[None].float() for name, mask in masks.items()},
                kept=scene.objects[kept],
            )
        )
    return cases


def jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """``image  # [3, H, W]`` saved as JPEG at ``quality`` and read back."""
    buffer = io.BytesIO()
    plots.to_pil(image).save(buffer, format="JPEG", quality=quality)
    array = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two batches ``[..., 3, H, W]`` in [0, 1] (per image, then the mean), capped at
    100 dB so that an unchanged image keeps the mean finite (``diffalign.images.psnr``)."""
    return image_psnr(a, b, max_db=100.0)


class Editors:
    """The attacker's two editors, run batched from seeded noise, identical for every method."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.inpaint = load_inpainting("shapes-inpaint")
        self.blended = blended_inpainting(pipeline.load("shapes"))
        for pipe in (self.inpaint, self.blended):
            pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def edit(self, condition: str, images: list[torch.Tensor], cases: list[Case]) -> torch.Tensor:
        """Edits ``[seeds, N, 3, H, W]`` of ``images`` under ``condition``; seed s is the same noise in every call."""
        mask_name = condition if condition in UNSEEN else "seen"
        pipe = self.blended if condition == "transfer" else self.inpaint
        if condition == "jpeg":
            images = [jpeg(image, self.settings.jpeg_quality) for image in images]
        keep = torch.stack([case.masks[mask_name] for case in cases])
        outputs = []
        for seed in range(self.settings.edit_seeds):
            result = pipe(
                prompt=[case.edit_prompt for case in cases],
                image=torch.stack(images),
                mask_image=1 - keep,
                height=images[0].shape[-2],
                width=images[0].shape[-1],
                num_inference_steps=self.settings.editor_steps,
                guidance_scale=self.settings.guidance,
                generator=torch.Generator().manual_seed(1000 + seed),
                output_type="pt",
            )
            outputs.append(result.images.float().cpu())
        return torch.stack(outputs)


class DirectionalSimilarity:
    """CLIP directional similarity with the ShapesWorld CLIP: cos(ΔI, ΔT) per edit."""

    def __init__(self):
        from diffalign.shapes.rewards import ShapesClip

        self.clip = ShapesClip()

    @torch.no_grad()
    def __call__(self, edits: torch.Tensor, cases: list[Case]) -> float:
        originals = self.clip.image_embeddings(torch.stack([case.image for case in cases]))
        text_change = self.clip.text_embeddings([c.edit_prompt for c in cases]) - self.clip.text_embeddings(
            [c.prompt for c in cases]
        )
        values = [
            torch.nn.functional.cosine_similarity(
                self.clip.image_embeddings(seed_edits) - originals, text_change
            )
            for seed_edits in edits
        ]
        return float(torch.cat(values).mean())


def kept_in_place(image: torch.Tensor, obj: Obj) -> bool:
    """Whether the detector finds ``obj``'s colour and shape in ``image`` within ``KEPT_TOLERANCE`` of its centre."""
    return any(
        found.colour == obj.colour
        and found.shape == obj.shape
        and abs(found.x - obj.x) < KEPT_TOLERANCE
        and abs(found.y - obj.y) < KEPT_TOLERANCE
        for found in detect(image)
    )


def edit_metrics(
    edits: torch.Tensor, reference: torch.Tensor, cases: list[Case], directional: DirectionalSimilarity
) -> dict[str, float]:
    """Oracle success and score of ``edits  # [seeds, N, 3, H, W]``, whether they keep the
    protected object in place, and their PSNR against ``reference`` edits."""
    scores = np.array(
        [[score(image, case.edit_prompt) for image, case in zip(seed_edits, cases)] for seed_edits in edits]
    )
    kept = np.array(
        [[kept_in_place(image, case.kept) for image, case in zip(seed_edits, cases)] for seed_edits in edits]
    )
    return {
        "success": float((scores == 1).mean()),
        "kept": float(kept.mean()),
        "faithful": float(((scores == 1) & kept).mean()),
        "oracle": float(scores.mean()),
        "psnr_vs_unprotected_edit": psnr(edits, reference),
        "clip_directional": directional(edits, cases),
    }


def _first_timestep_inputs(pipe, cases: list[Case], noises: int):
    """The empty prompt's embedding and ``noises`` fixed latent noises, shared by the measurements below."""
    size = cases[0].image.shape[-1] // pipe.vae_scale_factor
    latents = torch.randn(
        noises, pipe.vae.config.latent_channels, size, size, generator=torch.Generator().manual_seed(0)
    )
    return encode_text(pipe, ""), latents


@torch.no_grad()
def conditioning_leverage(
    pipe, cases: list[Case], timesteps: tuple[int, ...] = (951, 751, 501, 251), noises: int = 8
) -> dict[str, dict[str, float]]:
    """How much the kept region steers the editor at each timestep: ``‖ε̂(kept) − ε̂(grey)‖ / ‖ε̂‖``
    (``measured``), next to what an editor that read the kept region exactly would show
    (``exact_reader``).

    An ε-predicting editor whose clean-image estimate changes by Δz in the kept region changes
    its noise prediction by ``√(ᾱ_t / (1 − ᾱ_t)) · Δz``: at t = 951 the clean image makes up
    only 9 % of the noisy latent, so even a perfect reader depends on the kept region little
    there. DiffusionGuard can move ε̂ further only where the UNet is not such a reader, off
    the data it was trained on.
    """
    prompt_embeds, latents = _first_timestep_inputs(pipe, cases, noises)
    leverage = {}
    for timestep in timesteps:
        alpha = float(pipe.scheduler.alphas_cumprod[timestep])
        gain = math.sqrt(alpha / (1 - alpha))
        measured, exact = [], []
        for case in cases:
            image, keep = case.image[None], case.masks["seen"][None]
            condition = inpainting_condition(pipe, image, keep)
            grey = inpainting_condition(pipe, torch.full_like(image, 0.5), keep)
            kept = inpainting_unet(pipe, latents, timestep, condition, prompt_embeds)
            blank = inpainting_unet(pipe, latents, timestep, grey, prompt_embeds)
            norm = kept.flatten(1).norm(dim=1).mean()
            measured.append(float((kept - blank).flatten(1).norm(dim=1).mean() / norm))
            exact.append(
                float(gain * (condition.masked_image_latents - grey.masked_image_latents).norm() / norm)
            )
        leverage[str(timestep)] = {
            "measured": float(np.mean(measured)),
            "exact_reader": float(np.mean(exact)),
        }
    return leverage


@torch.no_grad()
def editor_input_change(
    pipe, cases: list[Case], protected: list[torch.Tensor], timestep: int, noises: int = 8
) -> dict[str, float]:
    """What a protection changed in the editor's inputs and output at ``timestep`` (seen mask).

    ``latent_shift``: ‖z(protected) − z(original)‖ / ‖z(original) − z(grey)‖ for the
    masked-image latents z, i.e. how far the perturbation moved the kept region's latents
    relative to the whole object's; ``noise_norm_gain``: the relative rise of ‖ε̂‖ over fixed
    noises (what DiffusionGuard maximises); ``noise_change``: ‖ε̂(protected) − ε̂(original)‖ / ‖ε̂‖.
    """
    prompt_embeds, latents = _first_timestep_inputs(pipe, cases, noises)
    shifts, gains, changes = [], [], []
    for case, image in zip(cases, protected):
        keep = case.masks["seen"][None]
        original = inpainting_condition(pipe, case.image[None], keep)
        attacked = inpainting_condition(pipe, image[None], keep)
        grey = inpainting_condition(pipe, torch.full_like(case.image[None], 0.5), keep)
        shifts.append(
            float(
                (attacked.masked_image_latents - original.masked_image_latents).norm()
                / (original.masked_image_latents - grey.masked_image_latents).norm()
            )
        )
        before = inpainting_unet(pipe, latents, timestep, original, prompt_embeds)
        after = inpainting_unet(pipe, latents, timestep, attacked, prompt_embeds)
        before_norm = before.flatten(1).norm(dim=1)
        gains.append(float((after.flatten(1).norm(dim=1) / before_norm).mean() - 1))
        changes.append(float(((after - before).flatten(1).norm(dim=1) / before_norm).mean()))
    return {
        "latent_shift": float(np.mean(shifts)),
        "noise_norm_gain": float(np.mean(gains)),
        "noise_change": float(np.mean(changes)),
    }


def protect_all(
    editors: Editors, cases: list[Case], method: str, budget: float, settings: Settings, progress: bool
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Protect every case's seen region; the protected images and the mean cost per image."""
    images, costs = [], []
    steps = settings.steps[method]
    for index, case in enumerate(tqdm(cases, desc=f"{method} {budget * 255:.0f}/255", disable=not progress)):
        result = defenses.protect(
            editors.inpaint,
            case.image,
            case.masks["seen"],
            method=method,
            budget=budget,
            step_size=budget * settings.step_fraction,
            steps=steps,
            generator=torch.Generator().manual_seed(settings.seed + index),
            **(
                {"editor_steps": settings.guard_editor_steps or settings.editor_steps}
                if method == "diffusionguard"
                else {}
            ),
        )
        images.append(result.image)
        costs.append((result.unet_calls, result.vae_calls, result.seconds))
    unet, vae, seconds = np.mean(costs, axis=0)
    originals = torch.stack([case.image for case in cases])
    protected = torch.stack(images)
    return images, {
        "steps": steps,
        "unet_passes": float(unet),
        "vae_passes": float(vae),
        "seconds": float(seconds),
        "psnr_vs_original": psnr(protected, originals),
        "linf_255": float((protected - originals).abs().max() * 255),
    }


def run(settings: Settings, output: Path | None = None, progress: bool = True) -> dict:
    """Protect, edit and score; writes the JSON to ``output`` and the figures beside it when given
    (the command: ``<--output>/protection.json``)."""
    started = time.perf_counter()
    cases = make_cases(settings.scenes, settings.seed)
    editors, directional = Editors(settings), DirectionalSimilarity()
    originals = [case.image for case in cases]
    unprotected = {condition: editors.edit(condition, originals, cases) for condition in CONDITIONS}
    result: dict = {
        "settings": asdict(settings),
        "unprotected": {c: edit_metrics(e, e, cases, directional) for c, e in unprotected.items()},
        "budgets": {},
        "examples": [{"prompt": c.prompt, "edit_prompt": c.edit_prompt} for c in cases[:4]],
        "conditioning_leverage": conditioning_leverage(editors.inpaint, cases),
    }
    examples: dict[str, torch.Tensor] = {}
    first_timestep = int(
        defenses.diffusionguard.attacked_timestep(editors.inpaint.scheduler, settings.editor_steps)
    )
    for budget in settings.budgets:
        per_method = {}
        for method in settings.methods:
            protected, cost = protect_all(editors, cases, method, budget, settings, progress)
            conditions = {}
            for condition in CONDITIONS:
                edits = editors.edit(condition, protected, cases)
                conditions[condition] = edit_metrics(edits, unprotected[condition], cases, directional)
                if condition == "seen" and budget == settings.budgets[0]:
                    examples[method] = torch.stack([torch.stack(protected[:4]), edits[0, :4]])
            conditions["unseen"] = {
                key: float(np.mean([conditions[c][key] for c in UNSEEN])) for key in conditions["seen"]
            }
            per_method[method] = {
                "cost": cost,
                "conditions": conditions,
                "editor_input": editor_input_change(editors.inpaint, cases, protected, first_timestep),
            }
        result["budgets"][f"{budget * 255:.0f}/255"] = per_method
    result["torch_threads"] = torch.get_num_threads()
    result["seconds"] = time.perf_counter() - started
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2), "utf-8")
        save_figure(result, output.with_suffix(".png"))
        save_examples(
            cases[:4], unprotected["seen"][0, :4], examples, output.with_name(output.stem + "_examples.png")
        )
    return result


def save_figure(result: dict, path: Path) -> Path:
    """Edit success per condition: unprotected, then each method, one panel per budget."""
    budgets = list(result["budgets"])
    figure, axes = plt.subplots(
        1, len(budgets), figsize=(5.5 * len(budgets), 3.6), squeeze=False, sharey=True
    )
    methods_run = result["settings"]["methods"]
    width = 0.8 / (len(methods_run) + 1)
    positions = np.arange(len(CONDITIONS))
    for axis, budget in zip(axes[0], budgets):
        bars: list[tuple[str, Callable[[str], float]]] = [
            ("unprotected", lambda c: result["unprotected"][c]["success"])
        ]
        methods = result["budgets"][budget]
        bars += [
            (m, lambda c, m=m, methods=methods: methods[m]["conditions"][c]["success"]) for m in methods_run
        ]
        for index, (label, value) in enumerate(bars):
            axis.bar(
                positions + (index - len(methods_run) / 2) * width,
                [value(c) for c in CONDITIONS],
                width,
                label=label,
            )
        axis.set_xticks(positions, CONDITIONS, fontsize=8)
        axis.set_title(f"budget {budget}", fontsize=9)
        axis.set_ylabel("edit success (oracle: exactly right)")
        axis.set_ylim(0, 1)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(
        "ShapesWorld protection benchmark: edit success, lower is better protection "
        "(editor shapes-inpaint; transfer: blended base)",
        fontsize=9,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def save_examples(
    cases: list[Case], clean_edits: torch.Tensor, examples: dict[str, torch.Tensor], path: Path
) -> Path:
    """Per scene: original, its edit, then each method's protected image and its edit (first budget, seen mask)."""
    images, captions = [], []
    for index, case in enumerate(cases):
        images += [case.image, clean_edits[index]]
        captions += [f"original: {case.prompt}", f"edit: {case.edit_prompt}"]
        for method, (protected, edits) in examples.items():
            images += [protected[index], edits[index]]
            captions += [f"{method}", f"edit of {method}"]
    columns = 2 + 2 * len(examples)
    return plots.save_grid(
        torch.stack(images),
        captions,
        path,
        columns=columns,
        title="ShapesWorld protection: original and protected images with their edits",
    )


def format_table(result: dict) -> str:
    """The README table: per budget and method, cost, imperceptibility, and success per condition."""
    header = (
        f"{'budget':<7} {'method':<15} {'steps':>5} {'UNet':>5} {'VAE':>5} {'s/img':>6} {'PSNR':>5} "
        + "".join(f"{c:>13}" for c in ("seen", "unseen", "jpeg", "transfer"))
    )
    lines = ["edit success (oracle exact; unprotected in the first row), lower is better", header]
    base = result["unprotected"]
    unseen = np.mean([base[c]["success"] for c in UNSEEN])
    lines.append(
        f"{'':<7} {'unprotected':<15} {'':>5} {'':>5} {'':>5} {'':>6} {'':>5} "
        f"{base['seen']['success']:13.3f}{unseen:13.3f}{base['jpeg']['success']:13.3f}"
        f"{base['transfer']['success']:13.3f}"
    )
    for budget, methods in result["budgets"].items():
        for method, entry in methods.items():
            cost, conditions = entry["cost"], entry["conditions"]
            lines.append(
                f"{budget:<7} {method:<15} {cost['steps']:>5} {cost['unet_passes']:>5.0f} {cost['vae_passes']:>5.0f} "
                f"{cost['seconds']:>6.1f} {cost['psnr_vs_original']:>5.1f} "
                + "".join(f"{conditions[c]['success']:13.3f}" for c in ("seen", "unseen", "jpeg", "transfer"))
            )
    lines += [
        "",
        "faithful edit success (exactly right and the protected object kept in place), lower is better",
        f"{'budget':<7} {'method':<15} "
        + "".join(f"{c:>10}" for c in ("seen", "unseen", "jpeg", "transfer"))
        + f"{'z shift':>10}{'‖ε̂‖ gain':>10}",
    ]
    lines.append(
        f"{'':<7} {'unprotected':<15} {base['seen']['faithful']:10.3f}"
        f"{np.mean([base[c]['faithful'] for c in UNSEEN]):10.3f}"
        f"{base['jpeg']['faithful']:10.3f}{base['transfer']['faithful']:10.3f}"
    )
    for budget, methods in result["budgets"].items():
        for method, entry in methods.items():
            conditions, seen_by_editor = entry["conditions"], entry["editor_input"]
            lines.append(
                f"{budget:<7} {method:<15} "
                + "".join(
                    f"{conditions[c]['faithful']:10.3f}" for c in ("seen", "unseen", "jpeg", "transfer")
                )
                + f"{seen_by_editor['latent_shift']:10.3f}{seen_by_editor['noise_norm_gain']:+10.4f}"
            )
    leverage = ", ".join(
        f"t={t}: {v['measured']:.3f} (exact reader {v['exact_reader']:.3f})"
        for t, v in result["conditioning_leverage"].items()
    )
    lines.append(f"editor's dependence on the kept region, ‖Δε̂‖/‖ε̂‖: {leverage}")
    lines.append(
        f"{result['settings']['scenes']} scenes x {result['settings']['edit_seeds']} editor seeds; "
        f"{result['seconds'] / 60:.1f} min, {result['torch_threads']} torch threads"
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m diffalign.benchmarks.protection`` and ``diffalign bench protection``."""
    parser.add_argument("--scenes", type=int, default=Settings.scenes, help="scenes protected and edited")
    parser.add_argument("--edit-seeds", type=int, default=Settings.edit_seeds, help="editor noises per scene")
    parser.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=[8, 32],
        metavar="B",
        help="L∞ budgets in 1/255 units (default: 8 32)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes and of the PGD noise")
    parser.add_argument(
        "--output",
        "-o",
        default="results/protection",
        help="folder for protection.json and its figures (default: %(default)s, under the current folder)",
    )
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to compare"
    )
    parser.add_argument(
        "--guard-editor-steps",
        type=int,
        metavar="N",
        help="DiffusionGuard attacks the first timestep of an N-step schedule "
        "(default: the attacker's 20; the reference code assumes 4, i.e. t=751)",
    )
    parser.add_argument("--quick", action="store_true", help="2 scenes, 1 budget, 3 PGD and 4 editor steps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def settings_from(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings(
            scenes=2,
            edit_seeds=1,
            budgets=[8 / 255],
            editor_steps=4,
            seed=args.seed,
            steps={"diffusionguard": 3, "photoguard": 3, "advdm": 3},
            methods=args.methods,
        )
    return Settings(
        scenes=args.scenes,
        edit_seeds=args.edit_seeds,
        budgets=[b / 255 for b in args.budgets],
        seed=args.seed,
        methods=args.methods,
        guard_editor_steps=args.guard_editor_steps,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    result = run(settings_from(args), Path(args.output) / "protection.json", progress=not args.no_progress)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
