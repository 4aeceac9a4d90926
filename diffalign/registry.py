"""The registries a world or a model family fills when it is imported, and how they find it.

Generic code never names a particular world. It looks names up here: built-in pipelines
(``register_pipeline``), prompt sets (``register_prompt_set``, with the models they are meant
for), TextNorm's contrast generators (``register_contrast``), FiFA's text-quality scorers
(``register_text_quality``) and per-data-set defaults (``register_filter_defaults``), and command
groups of the ``diffalign`` command (``register_command``), and subjects to personalise on
(``register_subject_set``), and autoencoders that replace a pipeline's own (``register_vae``). Rewards have their own registry,
``diffalign.rewards.register``, which finds providers the same way.

A *provider* is a module that registers things when it is imported, as ``diffalign.shapes``
(ShapesWorld) does. A registry imports the built-in providers (``PROVIDERS``) and the ones
installed packages declare under the entry-point group ``diffalign.providers`` the first time
it is asked for a name it does not hold, or for its whole list; code that imports its own
provider first needs neither. This module imports nothing heavy, so that a listing (``diffalign
rewards``, ``diffalign --help``) stays fast: registered loaders import their models when called.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from diffalign.errors import DiffalignError

# Modules that register built-in providers, imported by name on first need (like entry points of
# the diffalign distribution itself).
PROVIDERS: tuple[str, ...] = ("diffalign.shapes",)
ENTRY_POINT_GROUP = "diffalign.providers"

_loaded = False


class RegistryError(DiffalignError, ValueError):
    """A name is registered twice, or a provider cannot be imported."""


def load_providers() -> None:
    """Import every provider once: ``PROVIDERS``, then the ``diffalign.providers`` entry points."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # first, so that a provider that looks names up while registering does not recurse
    for module in PROVIDERS:
        importlib.import_module(module)
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as error:  # a broken third-party package must not take diffalign down silently
            raise RegistryError(
                f"the diffalign provider {entry.name!r} ({entry.value}) of an installed package failed to "
                f"import: {type(error).__name__}: {error}. Fix or uninstall that package."
            ) from error


def lazy(target: str) -> Callable[..., Any]:
    """A callable standing for ``"package.module:attribute"``, imported on its first call: how a
    provider registers a class without importing its module (and the module's torch)."""
    module, _, attribute = target.partition(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), attribute)(*args, **kwargs)

    call.__name__ = call.__qualname__ = attribute
    call.__doc__ = f"Imports {module} and calls its {attribute}."
    return call


def suggestion(name: str, names: list[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``names``, or an empty string."""
    close = difflib.get_close_matches(str(name), names, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """Entries by name, filled by providers on import; lookups import the providers on a miss."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, entry: Entry) -> Entry:
        if name in self._entries:
            raise RegistryError(f"{self.kind} name {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Entry | None:
        """The entry registered as ``name``, or None (after importing the providers)."""
        if name not in self._entries:
            load_providers()
        return self._entries.get(name)

    def names(self) -> list[str]:
        """Every registered name, in registration order (after importing the providers)."""
        load_providers()
        return list(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter([self._entries[name] for name in self.names()])

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None


# --- pipelines -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinPipeline:
    """A pipeline known by name: ``load(torch_dtype=..., seed=...)`` returns a diffusers pipeline."""

    name: str
    load: Callable[..., Any]
    kind: str  # "text-to-image" (a StableDiffusionPipeline) or "inpainting" (9-channel UNet)
    description: str


PIPELINE_KINDS = ("text-to-image", "inpainting")
PIPELINES: Registry[BuiltinPipeline] = Registry("pipeline")


def register_pipeline(
    name: str, load: Callable[..., Any], *, kind: str = "text-to-image", description: str = ""
) -> BuiltinPipeline:
    """Make ``name`` a model spec: ``diffalign.pipeline.load(name)`` (or ``load_inpainting`` for the
    inpainting kind) calls ``load(torch_dtype=..., seed=...)``, which imports what it needs."""
    if kind not in PIPELINE_KINDS:
        raise RegistryError(f"pipeline kind must be one of {', '.join(PIPELINE_KINDS)}, got {kind!r}")
    return PIPELINES.add(name, BuiltinPipeline(name, load, kind, description))


# --- prompt sets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSetEntry:
    """A prompt set known by name, and the models its prompts are written for.

    ``models`` is None for prompts any model can draw; otherwise the model specs that know the
    prompts' world (evaluating other models on them measures nothing), and ``world`` names it in
    messages.
    """

    name: str
    load: Callable[[], list[str]]
    models: tuple[str, ...] | None
    world: str
    description: str

    def fits(self, model: str) -> bool:
        return self.models is None or model in self.models


PROMPT_SETS: Registry[PromptSetEntry] = Registry("prompt set")


def register_prompt_set(
    name: str,
    load: Callable[[], list[str]],
    *,
    models: tuple[str, ...] | None = None,
    world: str = "",
    description: str = "",
) -> PromptSetEntry:
    """Make ``name`` a prompt set: ``load()`` returns its prompts in a fixed order."""
    return PROMPT_SETS.add(
        name, PromptSetEntry(name, load, tuple(models) if models else None, world, description)
    )


# --- contrast generators (TextNorm) --------------------------------------------------------------


@dataclass(frozen=True)
class ContrastEntry:
    """A contrast generator known by name: ``make(**options)``, or ``make(path, **options)`` for a
    generator written ``name:PATH``."""

    name: str
    make: Callable[..., Callable[[str], list[str]]]
    takes_path: bool
    description: str

    @property
    def spec(self) -> str:
        return f"{self.name}:PATH" if self.takes_path else self.name


CONTRASTS: Registry[ContrastEntry] = Registry("contrast generator")


def register_contrast(
    name: str,
    make: Callable[..., Callable[[str], list[str]]],
    *,
    takes_path: bool = False,
    description: str = "",
) -> ContrastEntry:
    """Make ``name`` (or ``name:PATH``) a contrast generator for TextNorm's ``contrast`` option."""
    return CONTRASTS.add(name, ContrastEntry(name, make, takes_path, description))


# --- command groups ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandGroup:
    """A ``diffalign <name> ...`` command: ``module`` has ``configure(parser)``, which adds its
    arguments (or subcommands) and handlers; it is imported only when the command is used."""

    name: str
    module: str
    help: str


COMMANDS: Registry[CommandGroup] = Registry("command")


def register_command(name: str, module: str, *, help: str) -> CommandGroup:  # argparse's word
    """Add ``diffalign <name>`` to the command, configured by ``module.configure(parser)``."""
    return COMMANDS.add(name, CommandGroup(name, module, help))


# --- preference data (offline methods: dpo; FiFA) -------------------------------------------------


@dataclass(frozen=True)
class PreferenceSetEntry:
    """A preference data set known by name (``data: NAME``).

    ``path(rebuild=False)`` returns the local file or folder that holds it, in one of the formats
    ``diffalign.preferences.open_preferences`` reads, building it first when it is generated (as
    ``shapes-prefs`` is, once, into the cache). ``models`` as for prompt sets: the model specs its
    prompts are written for, or None.
    """

    name: str
    path: Callable[..., Any]
    models: tuple[str, ...] | None
    world: str
    description: str

    def fits(self, model: str) -> bool:
        return self.models is None or model in self.models


PREFERENCE_SETS: Registry[PreferenceSetEntry] = Registry("preference set")


def register_preference_set(
    name: str,
    path: Callable[..., Any],
    *,
    models: tuple[str, ...] | None = None,
    world: str = "",
    description: str = "",
) -> PreferenceSetEntry:
    """Make ``name`` a preference data set: ``path(rebuild=False)`` returns where it is on disk."""
    return PREFERENCE_SETS.add(
        name, PreferenceSetEntry(name, path, tuple(models) if models else None, world, description)
    )


# --- text quality and filter defaults (FiFA) ------------------------------------------------------


@dataclass(frozen=True)
class TextQualityEntry:
    """A prompt text-quality scorer known by name: ``make(**options)``, or ``make(path, **options)``
    for one written ``name:PATH``. The scorer maps prompts to one score each, higher = better formed."""

    name: str
    make: Callable[..., Callable[[list[str]], Any]]
    takes_path: bool
    description: str

    @property
    def spec(self) -> str:
        return f"{self.name}:PATH" if self.takes_path else self.name


TEXT_QUALITY: Registry[TextQualityEntry] = Registry("text-quality scorer")


def register_text_quality(
    name: str,
    make: Callable[..., Callable[[list[str]], Any]],
    *,
    takes_path: bool = False,
    description: str = "",
) -> TextQualityEntry:
    """Make ``name`` (or ``name:PATH``) a text-quality scorer for FiFA (``diffalign data filter``)."""
    return TEXT_QUALITY.add(name, TextQualityEntry(name, make, takes_path, description))


@dataclass(frozen=True)
class FilterDefaults:
    """What FiFA uses for a registered preference set when the user names nothing: the reward whose
    margin scores its pairs and the text-quality scorer for its prompts (a world knows both)."""

    preference_set: str
    reward: str
    text_quality: str


FILTER_DEFAULTS: Registry[FilterDefaults] = Registry("filter defaults")


def register_filter_defaults(preference_set: str, *, reward: str, text_quality: str) -> FilterDefaults:
    """Make ``reward`` and ``text_quality`` FiFA's defaults for the preference set ``preference_set``."""
    return FILTER_DEFAULTS.add(preference_set, FilterDefaults(preference_set, reward, text_quality))


# --- Detect-and-Compare scorers (MuDI) ------------------------------------------------------------


@dataclass(frozen=True)
class DnCScorerEntry:
    """A D&C scorer known by name (``diffalign bench dnc --scorer NAME``): ``make(**options)`` returns a
    ``diffalign.dnc.DnCScorer``. ``world`` names the world whose images it can read ("" for any image)."""

    name: str
    make: Callable[..., Any]
    world: str
    description: str


DNC_SCORERS: Registry[DnCScorerEntry] = Registry("D&C scorer")


def register_dnc_scorer(
    name: str, make: Callable[..., Any], *, world: str = "", description: str = ""
) -> DnCScorerEntry:
    """Make ``name`` a Detect-and-Compare scorer: ``make(**options)`` builds it, importing what it needs."""
    return DNC_SCORERS.add(name, DnCScorerEntry(name, make, world, description))


# The generic scorer, for photographs of any subjects: registered here rather than by a provider
# because it names no world, and lazily so that listing scorers imports neither torch nor transformers.
register_dnc_scorer(
    "owlv2-dinov2",
    lazy("diffalign.dnc:OwlDinoDnC"),
    description="OWLv2 detects the subjects' class words, DINOv2 (CLS, cosine) compares crops with references",
)


# --- subject sets (personalisation: diffalign personalize --subjects NAME) ----------------------


@dataclass(frozen=True)
class SubjectSetEntry:
    """Subjects to personalise on, known by name (``subject_set: NAME``).

    ``make_folders(root)`` writes one folder of images (and ``NAME.mask.png`` masks) per subject
    under ``root`` and returns ``[(identifier, class_word, folder), ...]``, folders inside
    ``root``; ``diffalign.personalize`` calls it once per name and keeps the result in the cache.
    ``models`` as for prompt sets: the model specs that can draw these subjects' classes, or None.
    With no subjects given, ``diffalign personalize`` uses the first set that names the model.
    """

    name: str
    make_folders: Callable[[Any], list[tuple[str, str, Any]]]
    models: tuple[str, ...] | None
    world: str
    description: str
    vae: str = ""  # a registered VAE that can draw these subjects, used in place of the pipeline's own

    def fits(self, model: str) -> bool:
        return self.models is None or model in self.models


SUBJECT_SETS: Registry[SubjectSetEntry] = Registry("subject set")


def register_subject_set(
    name: str,
    make_folders: Callable[[Any], list[tuple[str, str, Any]]],
    *,
    models: tuple[str, ...] | None = None,
    world: str = "",
    description: str = "",
    vae: str = "",
) -> SubjectSetEntry:
    """Make ``name`` a subject set: ``make_folders(root)`` writes its subject folders under ``root``;
    ``vae`` names a registered VAE (``register_vae``) to draw them with when the model's own cannot."""
    return SUBJECT_SETS.add(
        name, SubjectSetEntry(name, make_folders, tuple(models) if models else None, world, description, vae)
    )


@dataclass(frozen=True)
class VaeEntry:
    """An autoencoder known by name, to use in place of a pipeline's own (``vae: NAME``), as Stable
    Diffusion users swap in a fine-tuned VAE (``sd-vae-ft-mse``): ``load(torch_dtype=...)`` returns a
    diffusers ``AutoencoderKL`` whose latents are the pipeline's (same encoder space and scale), so the
    UNet needs no change. ``models``: the model specs it fits."""

    name: str
    load: Callable[..., Any]
    models: tuple[str, ...]
    world: str
    description: str


VAES: Registry[VaeEntry] = Registry("VAE")


def register_vae(
    name: str, load: Callable[..., Any], *, models: tuple[str, ...], world: str = "", description: str = ""
) -> VaeEntry:
    """Make ``name`` a VAE that ``pipeline.swap_vae`` can put into the ``models``' pipelines."""
    return VAES.add(name, VaeEntry(name, load, tuple(models), world, description))
