"""Personalisation: DreamBooth with LoRA on one or several subjects, and MuDI's augmentations.

DreamBooth (Ruiz, Li, Jampani, Pritch, Rubinstein, Aberman; "DreamBooth: Fine Tuning Text-to-Image
Diffusion Models for Subject-Driven Generation", CVPR 2023, arXiv 2208.12242) binds a few images
of a subject to a rare identifier ("a photo of olis toy") by fine-tuning on them with the plain
denoising loss, and keeps the class word's meaning ("a photo of a toy") with a prior-preservation
term on images the *base* model drew of the class (paper eq. 2):

    L = E ‖ε − ε_θ(z_t, t, c)‖² + λ · E ‖ε' − ε_θ(z'_t', t', c_pr)‖²

Here θ is a LoRA adapter on the UNet (Hu et al. 2022), as in diffusers' ``train_dreambooth_lora.py``;
the text encoder is frozen. With several subjects every step draws examples of every subject. On a
Stable Diffusion 3-style flow model θ is a LoRA on the transformer and each term is the flow-matching
loss the model was pre-trained with, ‖(ε − z_0) − v_θ(z_s, s, c)‖² at z_s = (1 − s) z_0 + s ε with
SD3's logit-normal s moved by the scheduler's shift (Esser et al. 2024, §3.1); the model family
(``diffalign.families``) supplies the timesteps, noising, target and prediction for either.
Deviation: diffusers' SD3 DreamBooth scripts by default (``--precondition_outputs 1``) regress
z_0 through z_s − s·v_θ instead, which is this loss weighted by s²; the unweighted velocity loss
is kept here so that personalisation trains the objective the model (and Flow-DPO) uses.

MuDI (Jang, Jo, Lee, Hwang; "Identity Decoupling for Multi-Subject Personalization of Text-to-Image
Models", NeurIPS 2024, arXiv 2404.04243) adds, on top of that loop, training images composed of
several subjects with a caption naming each (``mode: segmix``, Seg-Mix: segmented subjects pasted
together; ``mode: cutmix``, the Cut-Mix baseline: image halves side by side) so the model learns to
keep identities apart, and at inference a mean-shifted initial noise (strength γ, ``eval.mean_shift``)
that starts sampling from the subjects' layout. The compositions live in ``diffalign.mudi``; this
file calls them. ``mode: dreambooth`` is the baseline: DreamBooth on all subjects at once. Seg-Mix and
the mean shift paste segmented subjects: images without a user mask are segmented by the CLIPSeg
checkpoint ``segmentation.checkpoint`` (``diffalign.mudi.ensure_masks``), and with neither the run is
refused before anything is written.

Subjects are folders (``subjects``) or a registered subject set (``subject_set``; with neither, the
first set a world registers for the model — ShapesWorld's ``shapes-similar-1`` for ``shapes``); the
run records what it trained on in ``subjects.json``. Each grid is also scored with Detect-and-Compare
(``diffalign.dnc``) on the images whose prompt names every subject, logged as ``eval/dnc``,
``eval/all_present`` and ``eval/mixed``: by ``eval.dnc_scorer``, by default the scorer registered for
the model's world (found through the registries by the world's name, so this file names none).

The loop mirrors ``diffalign.train``: accelerate for devices and precision, ``metrics.jsonl``, sample
grids of fixed prompts with fixed noise, atomic checkpoints (``diffalign.checkpoint``; a checkpoint
``epoch-NNNN`` holds the state after NNNN *steps*), exact resumption (each step's randomness comes
from a generator seeded by (seed, step, process)), and the adapter in diffusers' LoRA format at the
end, so ``pipe.load_lora_weights(output_dir / "lora")`` works in any diffusers program.

Class images are generated once per (model, prompt, count, seed, steps, guidance) and kept in
``<cache>/class-images/<key>/`` (``diffalign.outputs.cache_root()``: ``$DIFFALIGN_CACHE``, else
``$XDG_CACHE_HOME/diffalign``, else ``~/.cache/diffalign``); a second run reuses them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from diffalign import checkpoint, families, outputs, registry
from diffalign.config import (
    MIXED_PRECISION,
    ConfigError,
    LoraSection,
    _build,
    _merge,
    _suggest,
    at_least_one,
    doc,
    flatten,
    parse_override,
    read_yaml,
)
from diffalign.subjects import Subject, SubjectError, SubjectImages, check_identifiers, load_subjects

MODES = ("dreambooth", "cutmix", "segmix")
COMPOSING_MODES = ("cutmix", "segmix")


@dataclass
class PriorSection:
    """Prior preservation (DreamBooth eq. 2): keep what the class word means to the base model."""

    enabled: bool = doc(
        True, "add the denoising loss on class images the base model drew (keeps 'a toy' a toy)"
    )
    weight: float = doc(1.0, "lambda of eq. 2 (DreamBooth and diffusers' script use 1)")
    class_images: int = doc(
        100, "class images generated per class word, once, into the cache (diffusers' script default)"
    )
    class_prompt: str = doc(
        "a photo of a {class_word}", "prompt of the class images; {class_word} is filled in"
    )
    num_steps: int = doc(20, "DDIM steps of each class image")
    guidance_scale: float = doc(5.0, "classifier-free guidance scale of the class images")

    def validate(self, config: PersonalizeConfig) -> None:
        at_least_one("prior", self, ("class_images", "num_steps"))
        if self.weight < 0:
            raise ConfigError(f"prior.weight must be >= 0, got {self.weight}")
        _check_template("prior.class_prompt", self.class_prompt, "class_word")


@dataclass
class SegmentationSection:
    """Where Seg-Mix's masks come from when the user gave none (``diffalign.mudi.ensure_masks``)."""

    checkpoint: str = doc(
        "",
        "CLIPSeg checkpoint (local folder or cached hub id, e.g. CIDAS/clipseg-rd64-refined; tiny-random for "
        "tests) that segments each image without NAME.mask.png by its class word; '' = masks must be given",
    )
    threshold: float = doc(0.5, "CLIPSeg probability above which a pixel is the subject")

    def validate(self, config: PersonalizeConfig) -> None:
        if not 0 < self.threshold < 1:
            raise ConfigError(f"segmentation.threshold must be in (0, 1), got {self.threshold}")


AUTO = "auto"  # vae, eval.dnc_scorer: the one the subject set or the model's world registers


@dataclass
class PersonalizeEvalSection:
    """Sample grids of fixed prompts from fixed noise (η = 0), before training, every few steps and at the end."""

    prompts: list = doc(
        [],
        "prompts of the grids, naming subjects by their token ('olis toy on a beach'); [] = each subject's "
        "instance prompt and, with several subjects, one naming all of them ('... and ...')",
    )
    every: int = doc(100, "write a grid every this many steps (and before the first and after the last)")
    images_per_prompt: int = doc(2, "images per prompt in each grid, each from its own fixed noise")
    num_steps: int = doc(20, "DDIM steps of the grid samples")
    guidance_scale: float = doc(5.0, "classifier-free guidance scale of the grid samples")
    mean_shift: float = doc(
        0.0,
        "MuDI's mean-shifted initial noise, strength gamma (0 = plain Gaussian noise): the grid's noise is "
        "shifted towards the subjects' composed layout (diffalign.mudi.mean_shifted_latents; needs masks)",
    )
    dnc_scorer: str = doc(
        AUTO,
        "Detect-and-Compare scorer of the grid images whose prompt names every subject, logged as eval/dnc, "
        "eval/all_present, eval/mixed: a registered name (diffalign bench dnc --help), '' = off, auto = the "
        "one registered for the model's world (off when there is none or it cannot read the subjects)",
    )
    dnc_options: dict = doc({}, "keyword options of the D&C scorer, e.g. {checkpoint: tiny-random}")

    def validate(self, config: PersonalizeConfig) -> None:
        at_least_one("eval", self, ("every", "images_per_prompt", "num_steps"))
        if self.mean_shift < 0:
            raise ConfigError(f"eval.mean_shift (gamma) must be >= 0, got {self.mean_shift}")
        if self.dnc_scorer not in ("", AUTO) and self.dnc_scorer not in registry.DNC_SCORERS:
            names = registry.DNC_SCORERS.names()
            raise ConfigError(
                f"eval.dnc_scorer {self.dnc_scorer!r} is not a registered D&C scorer."
                f"{registry.suggestion(self.dnc_scorer, names)} Choose one of {', '.join(names)}, "
                f"{AUTO!r} (the model's world's own) or '' (off)"
            )
        if self.dnc_options and not self.dnc_scorer:
            raise ConfigError("eval.dnc_options are given but eval.dnc_scorer is '' (off); name a scorer")
        if not all(isinstance(prompt, str) and prompt.strip() for prompt in self.prompts):
            raise ConfigError(f"eval.prompts must be a list of non-empty prompts, got {self.prompts!r}")


@dataclass
class PersonalizeConfig:
    """One `diffalign personalize` run: subjects, how they are mixed, the loss, the adapter, the loop."""

    model: str = doc(
        "shapes", "pipeline: built-in name (shapes, tiny-random), local diffusers folder, or cached hub id"
    )
    subjects: list = doc(
        [],
        "[{identifier, class_word, folder}, ...]: the subjects, each a folder of a few images (NAME.mask.png = "
        "optional mask, white = subject); [] = subject_set",
    )
    subject_set: str = doc(
        "", "a registered subject set (used when subjects is []; '' = the first one registered for the model)"
    )
    vae: str = doc(
        AUTO,
        "autoencoder to draw with in place of the model's own (same latent space, as sd-vae-ft-mse for SD): a "
        "registered name, a folder (AutoencoderKL, or a pipeline's vae/) or a cached hub id; '' = the model's "
        "own; auto = the subject set's (ShapesWorld's shapes-vae-marked, which draws markings), else the model's",
    )
    mode: str = doc(
        "dreambooth",
        "dreambooth (all subjects, no composition) | cutmix (Cut-Mix baseline) | segmix (MuDI's Seg-Mix; "
        "needs a mask per image)",
    )
    mix_probability: float = doc(
        0.3,
        "cutmix/segmix: chance that a training example is a composed image of all subjects instead of one "
        "subject's photo (the rest keep learning each identity alone)",
    )
    instance_prompt: str = doc("a photo of {token}", "caption of a subject's images; {token} = 'olis toy'")
    steps: int = doc(400, "optimizer steps (diffusers' DreamBooth-LoRA example runs 500 on SD 1.5)")
    batch_size: int = doc(1, "images per subject per step (and as many class images per subject)")
    learning_rate: float = doc(1e-4, "AdamW learning rate of the LoRA (diffusers' DreamBooth-LoRA example)")
    max_grad_norm: float = doc(1.0, "gradient clipping norm")
    resolution: int = doc(
        0, "training image size in pixels; 0 = the pipeline's own (denoiser size x VAE factor)"
    )
    seed: int = doc(0, "seed for the LoRA init, example draws, noise, timesteps and the grids' noise")
    output_dir: str = doc("runs/personalize", "where metrics, grids, checkpoints and the final lora/ go")
    mixed_precision: str = doc("no", "accelerate mixed precision: no | fp16 | bf16")
    save_every: int = doc(100, "write a checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = doc(2, "how many recent checkpoints to keep")
    lora: LoraSection = doc(LoraSection, "LoRA adapter on the UNet (or an SD3 model's transformer)")
    prior: PriorSection = doc(PriorSection, "prior preservation")
    segmentation: SegmentationSection = doc(SegmentationSection, "masks for Seg-Mix and the mean shift")
    eval: PersonalizeEvalSection = doc(PersonalizeEvalSection, "sample grids and their D&C score")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def subject_list(self) -> list[Subject]:
        """The subjects named in ``subjects`` (empty when they come from a subject set)."""
        return [
            Subject(item["identifier"], item["class_word"], Path(item["folder"])) for item in self.subjects
        ]

    def validate(self) -> None:
        """Checks that need no file and no model; the subjects' folders are read by ``load_subjects``."""
        from diffalign import pipeline

        at_least_one("", self, ("steps", "batch_size", "save_every", "keep_checkpoints"))
        for spec in dataclasses.fields(self):
            section = getattr(self, spec.name)
            if dataclasses.is_dataclass(section):
                section.validate(self)
        if self.mode not in MODES:
            raise ConfigError(
                f"unknown mode {self.mode!r}.{_suggest(self.mode, list(MODES))} Choose one of: {', '.join(MODES)}."
            )
        if not 0 <= self.mix_probability <= 1:
            raise ConfigError(f"mix_probability must be in [0, 1], got {self.mix_probability}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.resolution < 0 or self.resolution % 8:
            raise ConfigError(
                f"resolution must be 0 (the pipeline's) or a positive multiple of 8, got {self.resolution}"
            )
        _check_template("instance_prompt", self.instance_prompt, "token")
        if not self.lora.enabled:
            raise ConfigError(
                "lora.enabled must be true: personalisation trains a LoRA adapter (saved in diffusers' format), "
                "never the full UNet or transformer"
            )
        try:
            pipeline.check_spec(self.model)
        except pipeline.PipelineError as error:
            raise ConfigError(f"model: {error}") from error
        for index, item in enumerate(self.subjects):
            keys = ("identifier", "class_word", "folder")
            if not isinstance(item, dict) or sorted(item) != sorted(keys):
                raise ConfigError(
                    f"subjects[{index}] must be a mapping with exactly identifier, class_word and folder, got {item!r}"
                )
            if not all(isinstance(item[key], str) and item[key] for key in keys):
                raise ConfigError(
                    f"subjects[{index}]: identifier, class_word and folder must be non-empty text"
                )
        if self.subjects and self.subject_set:
            raise ConfigError(
                f"give subjects or subject_set, not both (subject_set={self.subject_set!r} and {len(self.subjects)} "
                "subjects); set subject_set='' to train on your folders"
            )
        if self.subject_set:
            subject_set_entry(self.subject_set, self.model)
        if self.vae not in ("", AUTO) and self.vae not in registry.VAES:
            try:
                pipeline.check_spec(self.vae)
            except pipeline.PipelineError:
                names = registry.VAES.names()
                raise ConfigError(
                    f"vae {self.vae!r} is not a registered VAE, a folder or a hub id (org/name)."
                    f"{registry.suggestion(self.vae, names)} Registered: {', '.join(names) or 'none'}; "
                    f"or {AUTO!r} (the subject set's) or '' (the model's own)"
                ) from None
        if self.subjects:
            try:
                subjects = self.subject_list()
                check_identifiers(subjects)
                check_mode(self, subjects)
            except SubjectError as error:
                raise ConfigError(str(error)) from error


def _check_template(key: str, template: str, field_name: str) -> None:
    """A prompt template may use only ``{field_name}``; a stray brace is a typo, refused here."""
    names = re.findall(r"{([^{}]*)}", template)
    if f"{{{field_name}}}" not in template or any(name != field_name for name in names):
        raise ConfigError(
            f"{key} {template!r} must contain {{{field_name}}} and no other {{...}} field, "
            f"e.g. 'a photo of {{{field_name}}}'"
        )


def check_mode(config: PersonalizeConfig, subjects: list[Subject]) -> None:
    """What the mode asks of the subjects and the grid prompts (``SubjectError``).

    - A composing mode (cutmix, segmix) needs at least two subjects.
    - A composing mode trains on images of all subjects together, and its grids are there to show
      them together, so every ``eval.prompts`` entry must contain every subject's token
      (``identifier class_word``, whole words, case-insensitive): a prompt naming fewer subjects
      than are given is refused.

    In ``mode: dreambooth`` grid prompts are free (a class prompt such as "a photo of a toy" shows
    what prior preservation keeps).
    """
    if config.mode in COMPOSING_MODES and len(subjects) < 2:
        raise SubjectError(
            f"mode {config.mode} composes images of several subjects but {len(subjects)} is given; "
            "give at least two, or use mode=dreambooth"
        )
    for prompt in config.eval.prompts:
        named = [subject for subject in subjects if _names(prompt, subject)]
        if config.mode in COMPOSING_MODES and len(named) < len(subjects):
            missing = ", ".join(repr(s.token) for s in subjects if s not in named)
            raise SubjectError(
                f"eval prompt {prompt!r} names {len(named)} of the {len(subjects)} subjects (missing {missing}); "
                f"with mode={config.mode} every grid prompt must name every subject by its token"
            )


def _names(prompt: str, subject: Subject) -> bool:
    """Whether ``prompt`` contains the subject's token as whole words (case-insensitive)."""
    words = r"\s+".join(re.escape(word) for word in subject.token.lower().split())
    return re.search(rf"(?<![a-z0-9]){words}(?![a-z0-9])", prompt.lower()) is not None


def subject_set_entry(name: str, model: str) -> registry.SubjectSetEntry:
    """The registered subject set ``name``, refused (``ConfigError``) when unknown or not for ``model``."""
    entry = registry.SUBJECT_SETS.get(name)
    if entry is None:
        names = registry.SUBJECT_SETS.names()
        raise ConfigError(
            f"subject_set {name!r} is not registered.{registry.suggestion(name, names)} "
            f"Registered: {', '.join(names) or 'none'}; or give your own with subjects (--subject ID CLASS FOLDER)"
        )
    if not entry.fits(model):
        raise ConfigError(
            f"subject_set {name!r} holds {entry.world} subjects for the models {', '.join(entry.models or ())}, "
            f"but model is {model!r}"
        )
    return entry


def chosen_vae(config: PersonalizeConfig) -> str:
    """The VAE the run draws with: ``vae``, or for ``auto`` the subject set's when it is made for the
    model (``''`` = the model's own)."""
    if config.vae != AUTO:
        return config.vae
    entry = chosen_subject_set(config)
    vae = registry.VAES.get(entry.vae) if entry is not None and entry.vae else None
    return vae.name if vae is not None and config.model in vae.models else ""


def load_personalize_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PersonalizeConfig:
    """Defaults ← YAML file ← ``key=value`` overrides (as ``diffalign train``), then validated."""
    user: dict = read_yaml(path) if path else {}
    for text in overrides:
        user = _merge(user, parse_override(text))
    config = _build(PersonalizeConfig, user)
    config.validate()
    return config


# What a resumed run may change: how long it runs and what it writes, not what it learns.
RESUMABLE_KEYS = ("steps", "output_dir", "save_every", "keep_checkpoints", "eval.every")


def resume_changes(saved: PersonalizeConfig, config: PersonalizeConfig, run: Path) -> dict[str, list]:
    """``{key: [old, new]}`` of the settings a resume changes; anything outside ``RESUMABLE_KEYS`` is refused."""
    before, after = flatten(saved), flatten(config)
    changes = {key: [before[key], after.get(key)] for key in before if before[key] != after.get(key)}
    refused = {key: change for key, change in changes.items() if key not in RESUMABLE_KEYS}
    if refused:
        lines = "\n".join(f"  {key}: {old!r} in the run, {new!r} now" for key, (old, new) in refused.items())
        raise ConfigError(
            f"--resume would change the experiment of the run in {str(run)!r}, so it was refused (nothing was "
            f"changed):\n{lines}\nResume with the run's own settings (`diffalign personalize --output-dir {run} "
            f"--resume`), or start a new run in another output_dir; only {', '.join(RESUMABLE_KEYS)} may change."
        )
    return changes


# --- subjects and class images ---------------------------------------------------------------------


def resolve_subjects(config: PersonalizeConfig) -> list[tuple[str, str, str]]:
    """``[(identifier, class_word, folder), ...]``: the config's subjects, or those of its subject set
    (written once into ``<cache>/subject-sets/<name>/`` by the set's ``make_folders``)."""
    entry = chosen_subject_set(config)
    if entry is None:
        return [(item["identifier"], item["class_word"], item["folder"]) for item in config.subjects]
    root = outputs.cache_root() / "subject-sets" / entry.name
    listing = root / "subjects.json"
    if not listing.is_file():
        with outputs.cache_entry_lock(root):
            if not listing.is_file():  # another process may have made it while this one waited
                with outputs.staging_folder(root) as staging:
                    made = entry.make_folders(staging)
                    relative = [
                        (ident, cls, str(Path(folder).relative_to(staging))) for ident, cls, folder in made
                    ]
                    (staging / "subjects.json").write_text(json.dumps(relative), "utf-8")
    return [(ident, cls, str(root / folder)) for ident, cls, folder in json.loads(listing.read_text("utf-8"))]


def chosen_subject_set(config: PersonalizeConfig) -> registry.SubjectSetEntry | None:
    """The subject set the run trains on: ``subject_set``, or with neither subjects nor a set the first
    set registered for the model (a world registers its most telling set first); None for ``subjects``."""
    if config.subjects:
        return None
    if config.subject_set:
        return subject_set_entry(config.subject_set, config.model)
    fitting = [entry for entry in registry.SUBJECT_SETS if entry.models and config.model in entry.models]
    if not fitting:
        raise ConfigError(
            f"no subjects given and no subject set is registered for model {config.model!r}: give subjects "
            "(--subject IDENTIFIER CLASS FOLDER, e.g. --subject olis toy photos/toy) or subject_set=NAME"
        )
    return fitting[0]


def world_words(model: str) -> set[str]:
    """Every word of the prompt sets registered for ``model`` (its world's vocabulary, e.g. ShapesWorld's
    colours, shapes, numbers and relations); empty for a model no prompt set is written for."""
    words: set[str] = set()
    for entry in registry.PROMPT_SETS:
        if entry.models is not None and model in entry.models:
            for prompt in entry.load():
                words.update(re.findall(r"[a-z0-9]+", prompt.lower()))
    return words


def class_image_folder(config: PersonalizeConfig, class_word: str) -> Path:
    """Where the class images of ``class_word`` are cached: keyed by everything that makes them."""
    prior = config.prior
    recipe = {
        "model": str(Path(config.model).expanduser().resolve())
        if Path(config.model).expanduser().exists()
        else config.model,
        "prompt": prior.class_prompt.format(class_word=class_word),
        "count": prior.class_images,
        "seed": config.seed,
        "num_steps": prior.num_steps,
        "guidance_scale": prior.guidance_scale,
        **({"vae": vae} if (vae := chosen_vae(config)) else {}),  # older keys stay valid
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return outputs.cache_root() / "class-images" / key


def class_images(
    pipe, config: PersonalizeConfig, class_word: str, *, batch_size: int = 16
) -> list[Image.Image]:
    """The base model's images of ``class_word`` (``prior.class_prompt``), generated into the cache the
    first time and read back afterwards. Call before the adapter changes the UNet."""
    from diffalign.plots import to_pil
    from diffalign.sampling import sample

    folder = class_image_folder(config, class_word)
    prior, count = config.prior, config.prior.class_images
    with outputs.cache_entry_lock(folder):
        if not (folder / "recipe.json").is_file():  # made by another process while this one waited?
            prompt = prior.class_prompt.format(class_word=class_word)
            generator = torch.Generator().manual_seed(config.seed)
            with outputs.staging_folder(folder) as staging:
                for start in range(0, count, batch_size):
                    size = min(batch_size, count - start)
                    trajectory = sample(
                        pipe,
                        [prompt] * size,
                        num_steps=prior.num_steps,
                        guidance_scale=prior.guidance_scale,
                        eta=0.0,
                        generator=generator,
                    )
                    for offset, image in enumerate(trajectory.images):
                        to_pil(image).save(staging / f"{start + offset:05d}.png")
                recipe = {"model": config.model, "prompt": prompt, "count": count, "seed": config.seed}
                (staging / "recipe.json").write_text(json.dumps(recipe), "utf-8")
    return [Image.open(folder / f"{index:05d}.png").convert("RGB") for index in range(count)]


# --- the run ---------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One training image and its caption."""

    image: Image.Image
    prompt: str
    composed: bool = False  # a Cut-Mix / Seg-Mix image of all subjects


@dataclass
class PersonalizeResult:
    """Where a finished run put its outputs, and its per-step metrics."""

    output_dir: Path
    history: list[dict]
    lora_dir: Path | None
    main_process: bool = True


def default_eval_prompts(config: PersonalizeConfig, subjects: list[Subject]) -> list[str]:
    """``eval.prompts``, or each subject's instance prompt plus one naming all subjects (only the
    latter in a composing mode, whose grids must name every subject)."""
    if config.eval.prompts:
        return list(config.eval.prompts)
    together = [config.instance_prompt.format(token=" and ".join(s.token for s in subjects))]
    if config.mode in COMPOSING_MODES:
        return together
    alone = [config.instance_prompt.format(token=s.token) for s in subjects]
    return alone + (together if len(subjects) > 1 else [])


class Personalizer:
    """One personalisation run, step by step, as ``diffalign.train.Trainer`` is for reward training.

    ``Personalizer(config)`` validates the subjects (``SubjectError`` before anything is written),
    checks the output folder, loads the pipeline, makes or reads the class images, attaches the
    LoRA and (``resume=True``) restores the last checkpoint; ``evaluate()`` writes the grid of the
    current weights, ``run_step()`` trains one step and returns its record, ``finish()`` writes
    ``lora/`` and the loss curve.

        run = Personalizer(load_personalize_config(None, ["model=tiny-random", ...]))
        run.evaluate()                        # step 0: the base model
        while run.step < run.config.steps:
            record = run.run_step()
        result = run.finish()
    """

    def __init__(self, config: PersonalizeConfig, *, resume: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from diffalign import pipeline
        from diffalign.train import open_run_folder

        self.config = config
        # Subjects first: a refused folder or identifier must leave nothing behind.
        specs = resolve_subjects(config)
        try:
            self.subjects = load_subjects(specs, reserved=world_words(config.model))
            check_mode(config, [item.subject for item in self.subjects])
        except SubjectError as error:
            raise SubjectError(f"{error} (nothing was written)") from error
        user_masks = [sum(mask is not None for mask in item.masks) for item in self.subjects]
        if config.mode == "segmix" or config.eval.mean_shift > 0:
            self.subjects = complete_masks(config, self.subjects)
        self.prompts = default_eval_prompts(config, [item.subject for item in self.subjects])
        self.dnc_scorer = build_dnc_scorer(config, self.subjects)

        self.output = output = Path(config.output_dir).expanduser()
        self.checkpoints = output / "checkpoints"
        previous, changes = open_run_folder(
            output, resume, lambda saved: resume_changes(load_personalize_config(saved), config, output)
        )

        self.accelerator = accelerator = Accelerator(
            # Without a GPU, accelerate only sets up multi-process (gloo) training when told it is on CPU.
            cpu=not torch.cuda.is_available(),
            mixed_precision=config.mixed_precision,
            project_dir=str(output),
        )
        self.main = accelerator.is_main_process
        pipe = self.pipe = pipeline.load(config.model, seed=config.seed)
        self.family = families.of(pipe)
        # The module trained: the UNet of SD 1.x/2.x, the transformer of SD3 (unwrapped).
        self.denoiser = families.denoiser(pipe)
        self.vae = chosen_vae(config)
        if self.vae:
            pipeline.swap_vae(pipe, self.vae, config.model)
        pipe.to(accelerator.device)
        self.resolution = config.resolution or self.denoiser.config.sample_size * pipe.vae_scale_factor
        # The prior is what the *base* model draws, so the class images come before the adapter.
        self.class_images: dict[str, list[Image.Image]] = {}
        if config.prior.enabled:
            for class_word in dict.fromkeys(item.subject.class_word for item in self.subjects):
                if self.main:
                    self.class_images[class_word] = class_images(pipe, config, class_word)
                accelerator.wait_for_everyone()
                if not self.main:
                    self.class_images[class_word] = class_images(pipe, config, class_word)
        self.eval_latents = self._eval_latents()

        set_seed(config.seed)  # LoRA's random down-projection init
        pipeline.add_lora(
            pipe,
            rank=config.lora.rank,
            alpha=config.lora.alpha,
            target_modules=tuple(config.lora.target_modules),
            init=config.lora.init,
        )
        self.parameters = [p for p in self.denoiser.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.parameters, lr=config.learning_rate)
        self.model, self.optimizer = accelerator.prepare(self.denoiser, optimizer)
        accelerator.wait_for_everyone()

        self.step = 0
        self.history: list[dict] = []
        if self.main:
            outputs.remove_debris(output)
            checkpoint.remove_debris(self.checkpoints)
        if previous is not None:
            state = checkpoint.load(previous, unet=self.denoiser, lora=True, optimizer=self.optimizer)
            self.step, self.history = state["epoch"], state["history"]
            if self.main:
                record = {"step": self.step, "changes": changes, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
                with (output / "resumes.jsonl").open("a", encoding="utf-8") as stream:
                    stream.write(json.dumps(record) + "\n")
        self.metrics_path = output / "metrics.jsonl"
        if self.main:
            output.mkdir(parents=True, exist_ok=True)
            outputs.write_text(output / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
            # What was trained on, when a subject set or the model's default chose it.
            outputs.write_text(
                output / "subjects.json", json.dumps(self.describe_subjects(user_masks), indent=1)
            )
            # Metrics logged after the last checkpoint belong to steps that will be redone.
            outputs.write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history))

    def describe_subjects(self, user_masks: list[int]) -> dict:
        """What ``subjects.json`` records: the subject set (None for folders given as subjects), and per
        subject its token, folder, images and how many masks the user gave or the segmenter made."""
        entry = chosen_subject_set(self.config)
        return {
            "subject_set": entry.name if entry else None,
            # Draw with the same VAE when sampling the LoRA elsewhere (pipeline.swap_vae, or pipe.vae = ...).
            "vae": self.vae or None,
            "subjects": [
                {
                    "token": item.subject.token,
                    "folder": str(item.subject.folder),
                    "images": len(item.images),
                    "masks_given": given,
                    "masks_made": sum(mask is not None for mask in item.masks) - given,
                }
                for item, given in zip(self.subjects, user_masks, strict=True)
            ],
        }

    def _eval_latents(self) -> torch.Tensor:
        """The grids' fixed initial noise ``[P * images_per_prompt, C, h, w]``: Gaussian, or MuDI's
        mean-shifted noise when ``eval.mean_shift`` > 0."""
        from diffalign.evaluation import evaluation_generator

        count = len(self.prompts) * self.config.eval.images_per_prompt
        generator = evaluation_generator(self.config.seed)
        gamma = self.config.eval.mean_shift
        if gamma <= 0:
            return self.family.initial_latents(self.pipe, count, generator).cpu()
        from diffalign import mudi

        return torch.cat(
            [
                mudi.mean_shifted_latents(self.pipe, self.subjects, gamma=gamma, generator=generator).cpu()
                for _ in range(count)
            ]
        )

    def _append(self, record: dict) -> None:
        self.history.append(record)
        if self.main:
            with self.metrics_path.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(record) + "\n")

    def evaluate(self) -> dict[str, float]:
        """Sample the grid prompts from the fixed noise under the current weights; writes
        ``samples/step-NNNN.png`` (main process) and returns the D&C metrics of the images whose prompt
        names every subject (``{}`` without a scorer). At step 0 of a new run the metrics are also
        logged, as the base model's "before"."""
        if not self.main:
            return {}
        from diffalign import plots
        from diffalign.sampling import sample

        per_prompt = self.config.eval.images_per_prompt
        prompts = [prompt for prompt in self.prompts for _ in range(per_prompt)]
        was_training = self.denoiser.training
        self.denoiser.eval()
        with self.accelerator.autocast():
            images = sample(
                self.pipe,
                prompts,
                num_steps=self.config.eval.num_steps,
                guidance_scale=self.config.eval.guidance_scale,
                eta=0.0,
                latents=self.eval_latents.to(self.denoiser.device),
            ).images
        self.denoiser.train(was_training)
        plots.save_grid(
            images,
            prompts,
            self.output / "samples" / f"step-{self.step:04d}.png",
            title=f"step {self.step} — {self.config.mode}",
            columns=per_prompt * min(len(self.prompts), 2),
        )
        metrics = self.score_dnc(images, prompts)
        if self.step == 0 and not self.history and metrics:
            self._append({"step": 0, **metrics})
        return metrics

    def score_dnc(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """``eval/dnc`` (mean D&C), ``eval/all_present`` (share of images with every subject once) and
        ``eval/mixed`` (share with a mixed object; only when the scorer can tell) over ``images  # [B, 3,
        H, W]`` whose prompt names every subject. D&C asks whether the subjects appear *together* and
        apart, so images of one subject alone say nothing about it and are left out."""
        if self.dnc_scorer is None:
            return {}
        from diffalign import dnc

        subjects = [item.subject for item in self.subjects]
        chosen = [i for i, prompt in enumerate(prompts) if all(_names(prompt, s) for s in subjects)]
        if not chosen:
            return {}
        summary = dnc.summarise(self.dnc_scorer(images[chosen].float().cpu(), self.subjects))
        metrics = {"eval/dnc": summary["mean_dnc"], "eval/all_present": summary["all_present"]}
        if summary["mixing_rate"] is not None:
            metrics["eval/mixed"] = summary["mixing_rate"]
        return metrics

    def draw(self, rng: np.random.Generator) -> tuple[list[Example], list[Example]]:
        """One step's examples: ``batch_size`` of every subject (each replaced, in a composing mode and
        with ``mix_probability``, by an image composed of all subjects and its caption), and as many
        class images of each subject's class."""
        config = self.config
        instances, priors = [], []
        compose = None
        if config.mode in COMPOSING_MODES:
            from diffalign import mudi

            compose = mudi.seg_mix if config.mode == "segmix" else mudi.cut_mix
        for item in self.subjects:
            for _ in range(config.batch_size):
                if compose is not None and rng.random() < config.mix_probability:
                    image, caption = compose(self.subjects, rng, resolution=self.resolution)
                    instances.append(Example(image, caption, composed=True))
                else:
                    image = item.images[int(rng.integers(len(item.images)))]
                    instances.append(Example(image, config.instance_prompt.format(token=item.subject.token)))
                if config.prior.enabled:
                    pool = self.class_images[item.subject.class_word]
                    prompt = config.prior.class_prompt.format(class_word=item.subject.class_word)
                    priors.append(Example(pool[int(rng.integers(len(pool)))], prompt))
        return instances, priors

    def losses(self, examples: list[Example], generator: torch.Generator) -> torch.Tensor:
        """DreamBooth's per-example denoising errors ``# [B]`` (fp32), one noise and one timestep per
        example, on the objective the model was pre-trained with: ``‖ε − ε_θ(z_t, t, c)‖²`` for a
        UNet (the velocity replaces ε for v-prediction models), ``‖(ε − z_0) − v_θ(z_s, s, c)‖²`` at
        SD3's logit-normal s for a flow transformer (unweighted: module docstring)."""
        from diffalign.optim.dpo import denoising_errors, encode_images

        pipe, family = self.pipe, self.family
        latents = encode_images(pipe, [example.image for example in examples], self.resolution, generator)
        with torch.no_grad():
            conditioning = family.encode(pipe, [example.prompt for example in examples], "")
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        timesteps = family.training_timesteps(pipe, len(examples), generator).to(latents.device)
        noisy, target = family.noised(pipe, latents, noise, timesteps)
        with self.accelerator.autocast():
            prediction = family.denoise(self.model, noisy, timesteps, conditioning)
        return denoising_errors(prediction, target)

    def run_step(self) -> dict:
        """One optimizer step on every subject (and the class images); returns the step's record."""
        from diffalign.optim.base import check_finite
        from diffalign.train import epoch_seed

        config, accelerator = self.config, self.accelerator
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(
            epoch_seed(config.seed, self.step, accelerator.process_index)
        )
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        instances, priors = self.draw(rng)
        self.model.train()
        # One denoiser call on instances and class images together, as diffusers' script does.
        errors = self.losses(instances + priors, generator)
        instance_loss = errors[: len(instances)].mean()
        prior_loss = errors[len(instances) :].mean() if priors else torch.zeros(())
        loss = instance_loss + config.prior.weight * prior_loss
        check_finite(loss, "DreamBooth")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(self.parameters, config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.step = done = self.step + 1

        def reduce(value: torch.Tensor) -> float:
            return accelerator.reduce(value.detach().float(), reduction="mean").item()

        record = {
            "step": done,
            "loss": reduce(loss),
            "instance_loss": reduce(instance_loss),
            **({"prior_loss": reduce(prior_loss)} if priors else {}),
            "composed": sum(example.composed for example in instances),
            "seconds": time.perf_counter() - started,  # the step alone: evaluations are timed apart
        }
        if self.main and (done % config.eval.every == 0 or done == config.steps):
            evaluated = time.perf_counter()
            record.update(self.evaluate())
            record["eval_seconds"] = time.perf_counter() - evaluated
        self._append(record)
        if done % config.save_every == 0 or done == config.steps:
            self.save_checkpoint()
        return record

    def save_checkpoint(self) -> None:
        """Write the state after the current step (main process), atomically."""
        self.accelerator.wait_for_everyone()
        if self.main:
            checkpoint.save(
                self.checkpoints,
                epoch=self.step,
                unet=self.denoiser,
                lora=True,
                optimizer=self.optimizer,
                trainer_state={"history": self.history, "num_processes": self.accelerator.num_processes},
                method_state={},
                keep=self.config.keep_checkpoints,
            )

    def finish(self) -> PersonalizeResult:
        """Write ``lora/`` (diffusers format) and the loss curve; returns where everything is."""
        from diffalign import pipeline, plots

        self.accelerator.wait_for_everyone()
        lora_dir = None
        if self.main:
            lora_dir = self.output / "lora"
            pipeline.save_lora(self.denoiser, lora_dir)
            # One step's loss draws one timestep per example, so it jumps by 10x from step to step; the
            # running mean over a twentieth of the run is what shows whether the loss goes down.
            window = max(1, self.step // 20)
            plots.save_curves(
                running_means(self.history, ["loss", "instance_loss", "prior_loss"], window),
                ["loss", "instance_loss", "prior_loss"],
                self.output / "loss_curve.png",
                x="step",
                title=f"{self.config.mode} on {self.config.model} (running mean of {window} steps)",
            )
            eval_keys = [key for key in EVAL_KEYS if any(key in record for record in self.history)]
            if eval_keys:
                plots.save_curves(
                    self.history,
                    eval_keys,
                    self.output / "dnc_curve.png",
                    x="step",
                    title=f"D&C of the multi-subject grid prompt — {self.config.mode}",
                )
        self.accelerator.end_training()
        return PersonalizeResult(self.output, self.history, lora_dir, self.main)


EVAL_KEYS = ("eval/dnc", "eval/all_present", "eval/mixed")


def running_means(history: list[dict], keys: list[str], window: int) -> list[dict]:
    """``{"step", key: mean of the last ``window`` values of key, ...}`` per training record (for plots)."""
    smoothed, recent = [], {key: [] for key in keys}
    for record in history:
        if "loss" not in record:
            continue  # the step-0 evaluation
        row = {"step": record["step"]}
        for key in keys:
            if key in record:
                recent[key] = [*recent[key][-(window - 1) :], record[key]] if window > 1 else [record[key]]
                row[key] = sum(recent[key]) / len(recent[key])
        smoothed.append(row)
    return smoothed


def complete_masks(config: PersonalizeConfig, subjects: list[SubjectImages]) -> list[SubjectImages]:
    """The subjects with a mask for every image: Seg-Mix and the mean shift paste segmented subjects.

    Masks the user gave are kept; the others come from ``segmentation.checkpoint`` (CLIPSeg, prompted
    with the class word). With neither, the error names the images and both fixes, before anything is
    written.
    """
    from diffalign import mudi

    checkpoint = config.segmentation.checkpoint
    if not checkpoint:
        for item in subjects:
            missing = [index for index, mask in enumerate(item.masks) if mask is None]
            if missing:
                needs = "mode segmix pastes" if config.mode == "segmix" else "eval.mean_shift > 0 composes"
                raise SubjectError(
                    f"{needs} segmented subjects, but {len(missing)} of the {len(item.images)} images of "
                    f"{item.subject.token!r} in {item.subject.folder} have no mask: add NAME.mask.png (white = "
                    "the subject) beside each image, or set segmentation.checkpoint to a CLIPSeg checkpoint "
                    f"(e.g. {mudi.CLIPSEG_ID}) to make them; or use mode=cutmix with eval.mean_shift=0 "
                    "(nothing was written)"
                )
        return subjects
    try:
        completed = mudi.ensure_masks(
            subjects, checkpoint=checkpoint, threshold=config.segmentation.threshold
        )
    except mudi.MissingSegmenterError as error:
        raise mudi.MissingSegmenterError(
            f"segmentation.checkpoint: {error}\n(nothing was written)"
        ) from error
    # A model mask that marks nothing would stop Seg-Mix mid-run with advice to redraw a mask the user never drew.
    for given, item in zip(subjects, completed, strict=True):
        for index, (mine, made) in enumerate(zip(given.masks, item.masks, strict=False)):
            if mine is None and made.getextrema()[1] < mudi.MASK_THRESHOLD:
                raise SubjectError(
                    f"{checkpoint} found no {item.subject.class_word!r} in image {index} of {item.subject.token!r} "
                    f"({item.subject.folder}) at segmentation.threshold={config.segmentation.threshold}: lower the "
                    "threshold, or give that image a mask (NAME.mask.png, white = the subject) (nothing was written)"
                )
    return completed


def model_worlds(model: str) -> list[str]:
    """The worlds whose prompt sets or subject sets are registered for ``model`` (e.g. ShapesWorld for
    ``shapes``), in registration order; empty for a model no world names."""
    worlds: dict[str, None] = {}
    for entries in (registry.PROMPT_SETS, registry.SUBJECT_SETS):
        for entry in entries:
            if entry.world and entry.models is not None and model in entry.models:
                worlds[entry.world] = None
    return list(worlds)


def build_dnc_scorer(config: PersonalizeConfig, subjects: list[SubjectImages]):
    """The D&C scorer of ``eval.dnc_scorer``, tried once on a reference image so that a scorer that
    cannot read these subjects is known before anything is written; None when off.

    ``auto`` takes the first scorer registered for the model's world and quietly turns off (with a
    warning) when there is none, or when it cannot read the subjects (a world's exact scorer knows
    its own subjects only); a scorer named explicitly must work, or the run is refused.
    """
    from diffalign import dnc

    name = config.eval.dnc_scorer
    if not name or (name == AUTO and len(subjects) < 2):
        return None
    if name == AUTO:
        worlds = model_worlds(config.model)
        fitting = [entry.name for entry in registry.DNC_SCORERS if entry.world and entry.world in worlds]
        if not fitting:
            return None
        name = fitting[0]
    scorer = dnc.build(name, **config.eval.dnc_options)
    probe = torch.from_numpy(np.asarray(subjects[0].images[0].convert("RGB"), dtype=np.float32) / 255.0)
    try:
        scorer(probe.permute(2, 0, 1)[None], subjects)
    except SubjectError as error:
        if config.eval.dnc_scorer != AUTO:
            raise SubjectError(
                f"eval.dnc_scorer {name!r} cannot score these subjects: {error}. Set eval.dnc_scorer to another "
                "scorer, or '' (off) (nothing was written)"
            ) from error
        warnings.warn(
            f"no D&C during evaluation: {name!r}, the scorer of the model's world, cannot score these subjects "
            f"({error}); set eval.dnc_scorer to choose one, or '' to silence this",
            stacklevel=3,
        )
        return None
    return scorer


def personalize(
    config: PersonalizeConfig, *, resume: bool = False, progress: bool = True
) -> PersonalizeResult:
    """Train a LoRA on ``config``'s subjects for ``config.steps`` steps (continuing the last checkpoint
    if ``resume``); what ``diffalign personalize`` runs."""
    from tqdm.auto import tqdm

    run = Personalizer(config, resume=resume)
    if run.step == 0:
        run.evaluate()
    bar = tqdm(
        range(run.step, config.steps), desc=f"{config.mode} steps", disable=not (progress and run.main)
    )
    for _ in bar:
        record = run.run_step()
        bar.set_postfix({"loss": f"{record['loss']:.4g}"})
    if run.step > config.steps:
        warnings.warn(
            f"the run had already done {run.step} steps, more than steps={config.steps}", stacklevel=2
        )
    return run.finish()
