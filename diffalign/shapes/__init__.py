"""ShapesWorld, diffalign's embedded default world: coloured shapes with compositional
captions ("a red circle left of a blue square") and an exact detector that measures how
well a generated image matches its prompt.

- ``world``: objects, scenes, random sampling, anti-aliased rendering.
- ``grammar``: prompts ↔ ``Facts`` ↔ scenes (``parse``, ``text``, ``caption``, ``scene_for``).
- ``splits``: train / held-out compositions, prompt sets, training pairs.
- ``detector``: objects from pixels (``detect``) and prompt fit (``score``, ``score_batch``).
- ``fit``: the detector's shape classifier (blurred templates fitted to a blob).
- ``accuracy``: the detector's measured exactness and speed.
- ``models`` / ``assets``: the small models' architectures and the shipped weights.
- ``rewards``: ``shapes-clip``, ``shapes-negclip`` (learned proxies) and ``shapes-oracle`` (exact).
- ``contrast``: TextNorm's ``shapes`` contrast generator, exact for the grammar.
- ``prefs``: ``shapes-prefs``, a preference data set (Pick-a-Pic's format) with its ground truth.
- ``identities`` / ``dnc``: marked subjects for MuDI, their exact detector and the ``shapes-exact`` D&C.
  Each subject pair is a subject set ``shapes-similar-1`` ... ``shapes-dissimilar-3`` for
  ``diffalign personalize --subjects NAME``, written into the cache on first use.
- ``cli``: the ``diffalign shapes`` commands that retrain the shipped models and build ``shapes-prefs``.

Importing this package makes the world known to generic code, which never names it: the
pipelines ``shapes`` and ``shapes-inpaint``, the prompt sets ``shapes-*`` (written for the
``shapes`` model, and ``tiny-random`` for tests), the three rewards, the contrast generator, the
preference set ``shapes-prefs`` (generated into the cache on first use), the subject sets
``shapes-similar-1`` ... ``shapes-dissimilar-3``, the D&C scorer ``shapes-exact``, the VAE ``shapes-vae-marked`` (``marked_vae``: draws the subjects'
markings, which the shipped VAE cannot) and the ``shapes`` command. Registration imports nothing heavy; the names below (``parse``, ``detect``, ...) are
imported from their modules on first use.
"""

from __future__ import annotations

import importlib

from diffalign import registry
from diffalign.rewards.base import register as register_reward

# name -> (split, kind) of ``splits.prompts``; kept here so that registering the sets reads no grammar.
PROMPT_SETS: dict[str, tuple[str, str]] = {
    "shapes-train": ("train", "all"),
    "shapes-heldout": ("heldout", "all"),
    "shapes-single": ("train", "single"),
    "shapes-count": ("train", "count"),
    "shapes-relation": ("train", "relation"),
}
# Models that draw ShapesWorld: the shipped one, and the random test model of the same latent size.
MODELS = ("shapes", "shapes-flow", "tiny-random", "tiny-random-flow")
# The keys of ``identities.SUBJECT_PAIRS``, registered as subject sets ``shapes-<pair>``; kept here so that
# registering them imports no numpy (a test checks the two agree). Similar pairs first: with no subjects
# given, ``diffalign personalize`` takes the first set, and a similar pair is where identities mix.
SUBJECT_PAIR_NAMES = ("similar-1", "similar-2", "similar-3", "dissimilar-1", "dissimilar-2", "dissimilar-3")


def _load_pipeline(*, torch_dtype, seed: int):
    from diffalign.shapes import assets

    return assets.load_pipeline(torch_dtype=torch_dtype)  # trained weights: the seed picks nothing


def _load_flow_pipeline(*, torch_dtype, seed: int):
    from diffalign.shapes import assets

    return assets.load_flow_pipeline(torch_dtype=torch_dtype)


def _load_inpainting_pipeline(*, torch_dtype, seed: int):
    from diffalign.shapes import assets

    return assets.load_inpainting_pipeline(torch_dtype=torch_dtype)


def _load_marked_vae(*, torch_dtype):
    from diffalign.shapes import assets

    return assets.load_marked_vae(torch_dtype=torch_dtype)


def _subject_folders(pair: str):
    def make_folders(root) -> list[tuple[str, str, object]]:
        from diffalign.shapes.identities import write_pair_folders

        return [(s.identifier, s.class_word, s.folder) for s in write_pair_folders(pair, root)]

    return make_folders


def _prompt_set(name: str):
    def load() -> list[str]:
        from diffalign.shapes.splits import prompt_set

        return prompt_set(name)

    return load


registry.register_pipeline(
    "shapes", _load_pipeline, description="the shipped ShapesWorld Stable Diffusion pipeline (32x32 images)"
)
registry.register_pipeline(
    "shapes-flow",
    _load_flow_pipeline,
    description="the shipped ShapesWorld Stable Diffusion 3-style pipeline (MM-DiT, rectified flow; 32x32 images)",
)
registry.register_pipeline(
    "shapes-inpaint",
    _load_inpainting_pipeline,
    kind="inpainting",
    description="the shipped ShapesWorld inpainting editor (9-channel UNet, the shapes VAE and text encoder)",
)
for _name, (_split, _kind) in PROMPT_SETS.items():
    registry.register_prompt_set(
        _name, _prompt_set(_name), models=MODELS, world="ShapesWorld", description=f"{_split} split, {_kind}"
    )
register_reward(
    "shapes-clip",
    description="ShapesWorld CLIP (shipped, trained on the world): cosine of image and prompt embeddings",
    differentiable=True,
)(registry.lazy("diffalign.shapes.rewards:ShapesClip"))
register_reward(
    "shapes-negclip",
    description="ShapesWorld CLIP fine-tuned with hard negatives (NegCLIP): reads relations and counts",
    differentiable=True,
)(registry.lazy("diffalign.shapes.rewards:ShapesNegClip"))
register_reward(
    "shapes-oracle",
    description="ShapesWorld exact detector: fraction of the prompt's facts that hold (ground truth)",
    differentiable=False,
)(registry.lazy("diffalign.shapes.rewards:ShapesOracle"))
registry.register_contrast(
    "shapes",
    registry.lazy("diffalign.shapes.contrast:ShapesContrast"),
    description="exact, rule-based, for the ShapesWorld grammar",
)
registry.register_text_quality(
    "shapes-grammar",
    registry.lazy("diffalign.shapes.text_quality:GrammarQuality"),
    description="1 for a prompt of the ShapesWorld grammar, else half the share of its words the grammar knows",
)
registry.register_filter_defaults("shapes-prefs", reward="shapes-clip", text_quality="shapes-grammar")
registry.register_preference_set(
    "shapes-prefs",
    registry.lazy("diffalign.shapes.prefs:cached_path"),
    models=MODELS,
    world="ShapesWorld",
    description="2400 simulated-annotator pairs of the shipped model's images, with ties, label noise, "
    "near-duplicate and broken prompts, and the oracle's ground truth (built once into the cache)",
)
for _pair in SUBJECT_PAIR_NAMES:
    _kind = "same shape and colour, different marking" if _pair.startswith("similar") else "nothing shared"
    registry.register_subject_set(
        f"shapes-{_pair}",
        _subject_folders(_pair),
        models=MODELS,
        world="ShapesWorld",
        description=f"two marked shapes, {_kind} (4 references each, with masks)",
        vae="shapes-vae-marked",  # the shipped VAE cannot draw markings (diffalign.shapes.marked_vae)
    )
registry.register_vae(
    "shapes-vae-marked",
    _load_marked_vae,
    models=("shapes", "shapes-flow"),  # both denoise the shipped VAE's latents (shapes-flow with shift 0)
    world="ShapesWorld",
    description="the shapes VAE fine-tuned to draw marked shapes (MuDI subjects), same latent space",
)
registry.register_dnc_scorer(
    "shapes-exact",
    registry.lazy("diffalign.shapes.dnc:ShapesDnC"),
    world="ShapesWorld",
    description="exact D&C from the identity detector: shape, colour and marking of each subject",
)
registry.register_command(
    "shapes", "diffalign.shapes.cli", help="ShapesWorld: the embedded default world and its models"
)

# The public names of the world's modules, imported on first access (PEP 562).
_EXPORTS = {
    "detector": ("Detection", "correct", "detect", "score", "score_batch"),
    "grammar": (
        "Entity",
        "Facts",
        "PromptOutsideGrammar",
        "Relation",
        "caption",
        "parse",
        "scene_for",
        "text",
    ),
    "splits": ("HELDOUT_PAIRS", "prompt_set", "prompts", "training_pairs"),
    "world": ("COLOURS", "SHAPES", "Obj", "Scene", "random_scene", "render"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"diffalign.shapes.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'diffalign.shapes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE_OF])


__all__ = [  # noqa: RUF022 - grouped as _EXPORTS is
    "MODELS",
    "PROMPT_SETS",
    "SUBJECT_PAIR_NAMES",
    "Detection",
    "correct",
    "detect",
    "score",
    "score_batch",
    "Entity",
    "Facts",
    "PromptOutsideGrammar",
    "Relation",
    "caption",
    "parse",
    "scene_for",
    "text",
    "HELDOUT_PAIRS",
    "prompt_set",
    "prompts",
    "training_pairs",
    "COLOURS",
    "SHAPES",
    "Obj",
    "Scene",
    "random_scene",
    "render",
]
