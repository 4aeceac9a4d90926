"""Training configuration: documented dataclasses, YAML presets, dotted command-line overrides.

A run's configuration is built in layers — the dataclass defaults, the preset of the chosen
method, the user's YAML file, then ``--set section.key=value`` overrides — and validated once,
at load, with messages that name the field and suggest the closest valid one.

``TrainConfig`` is ``CommonConfig`` (the sections every run has) plus one section per registered
method (``diffalign.optim``), under the method's name: the method file declares its section, so
adding a method adds its keys here. Each section checks its own fields (``validate``); the
chosen method checks what it needs from the rest (``Method.validate``); ``validate`` below checks
what ties sections together, and the names of models, rewards and prompt sets.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from diffalign.errors import DiffalignError


class ConfigError(DiffalignError, ValueError):
    """A configuration key or value is wrong; the message says which and how to fix it."""


class _Int(int):
    """An integer read from YAML that remembers how it was written (for string-valued keys)."""

    text: str


class _Float(float):
    """A float read from YAML that remembers how it was written (for string-valued keys)."""

    text: str


class _Loader(yaml.SafeLoader):
    """YAML with the core schema of YAML 1.2 for unquoted scalars.

    PyYAML follows YAML 1.1, where ``no``, ``off``, ``y`` and ``on`` are booleans (so
    ``mixed_precision: no`` read as False), ``0777`` is octal, ``1:30`` is the number 90 and
    ``1e-4`` is a string. Here only true/false are booleans, integers are decimal (or ``0x``/
    ``0o``), and ``1e-4`` is a float. Numbers keep their spelling, so a string-valued key given
    ``007`` gets ``"007"``, not ``"7"``.
    """


_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _Int:
    text = loader.construct_scalar(node)
    if text.startswith(("0x", "0o")):
        value = _Int(int(text[2:], 16 if text[1] == "x" else 8))
    else:
        value = _Int(int(text, 10))
    value.text = text
    return value


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _Float:
    text = loader.construct_scalar(node)
    value = _Float(float(text.lower().replace(".inf", "inf").replace(".nan", "nan")))
    value.text = text
    return value


_Loader.add_constructor(_INT, _construct_int)
_Loader.add_constructor(_FLOAT, _construct_float)
_YAML_1_1_BOOLEANS = {"yes": True, "y": True, "on": True, "no": False, "n": False, "off": False}


def yaml_load(text: str):
    """Parse a config document or value with ``_Loader`` (YAML 1.2 scalars)."""
    return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader


def doc(default: Any, help: str) -> Any:  # "help" reads best at the call sites
    """A dataclass field with its documentation attached (shown by ``diffalign train --help``)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class LoraSection:
    """How the denoiser (UNet or transformer) is made trainable."""

    enabled: bool = doc(True, "train a LoRA adapter (peft) instead of the whole UNet or transformer")
    rank: int = doc(4, "LoRA rank; 4 is DDPO's choice for SD 1.x, enough for reward fine-tuning")
    alpha: float = doc(4.0, "LoRA scale numerator (effective scale alpha/rank)")
    init: str = doc(
        "default",
        "down-projection init (peft's init_lora_weights): default = Kaiming-uniform, gaussian = N(0, 1/rank^2) as "
        "ddpo-pytorch and trl; the up-projection starts at 0 either way, so the model starts unchanged",
    )
    target_modules: list = doc(
        [],
        "modules that get LoRA matrices (peft names); empty = the model family's attention projections "
        "(a UNet's to_q/to_k/to_v/to_out.0; an SD3 transformer's image and text streams, as Flow-GRPO)",
    )

    def validate(self, config: CommonConfig) -> None:
        at_least_one("lora", self, ("rank",))
        if self.init not in LORA_INITS:
            raise ConfigError(
                f"unknown lora.init {self.init!r}.{_suggest(self.init, list(LORA_INITS))} "
                f"Choose one of: {', '.join(LORA_INITS)}."
            )


@dataclass
class SampleSection:
    """Online sampling: how the images that get rewarded are drawn."""

    num_steps: int = doc(20, "DDIM steps per image (DDPO used 50 on SD; 20 keeps CPU runs short)")
    eta: float = doc(
        1.0,
        "DDIM eta, or a flow model's SDE noise level; must be > 0 for policy-gradient methods (the step must be "
        "stochastic)",
    )
    guidance_scale: float = doc(5.0, "classifier-free guidance scale")
    negative_prompt: str = doc("", "unconditional prompt for classifier-free guidance")
    batch_size: int = doc(16, "images per sampling batch on each process")
    num_batches_per_epoch: int = doc(
        2, "sampling batches per epoch; samples/epoch = this x batch_size x processes"
    )
    images_per_prompt: int = doc(
        4, "images sampled per drawn prompt in a batch, so advantages compare images of the same prompt"
    )
    stochastic_steps: list = doc(
        [],
        "[first, last]: only these denoising steps (0-based, inclusive) are sampled with eta and trained "
        "by ddpo/grpo, the rest run deterministically (MixGRPO's window); [] = every step",
    )
    shared_initial_noise: bool = doc(
        False,
        "the images of one prompt start from the same x_T (group-shared noise; see benchmarks/gradient_snr.py)",
    )

    def validate(self, config: CommonConfig) -> None:
        at_least_one(
            "sample", self, ("num_steps", "batch_size", "num_batches_per_epoch", "images_per_prompt")
        )
        window, steps = self.stochastic_steps, self.num_steps
        if window and (
            len(window) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in window)
            or not 0 <= window[0] <= window[1] < steps
        ):
            raise ConfigError(
                f"sample.stochastic_steps must be [first, last] with 0 <= first <= last < sample.num_steps "
                f"({steps}), got {window}; set sample.stochastic_steps=[] to make every step stochastic"
            )
        if self.batch_size % self.images_per_prompt:
            raise ConfigError(
                f"sample.batch_size ({self.batch_size}) must be divisible by "
                f"sample.images_per_prompt ({self.images_per_prompt})"
            )


@dataclass
class OptimSection:
    """The gradient updates shared by every method."""

    batch_size: int = doc(4, "samples per training micro-batch (one optimizer step each, by default)")
    gradient_accumulation_steps: int = doc(
        1, "micro-batches per optimizer step (DDPO also accumulates over the trained timesteps)"
    )
    learning_rate: float = doc(
        1e-3,
        "AdamW learning rate (ShapesWorld's small UNet; 5e-3 degrades it; DDPO used 3e-4 for SD 1.5 LoRA)",
    )
    adam_beta1: float = doc(0.9, "AdamW beta1")
    adam_beta2: float = doc(0.999, "AdamW beta2")
    adam_weight_decay: float = doc(1e-4, "AdamW weight decay")
    adam_epsilon: float = doc(1e-8, "AdamW epsilon")
    max_grad_norm: float = doc(1.0, "gradient clipping norm")
    inner_epochs: int = doc(1, "passes over each epoch's samples")
    timestep_fraction: float = doc(
        0.5,
        "fraction of each trajectory's trainable steps (all, or sample.stochastic_steps) trained on, a random subset",
    )

    def validate(self, config: CommonConfig) -> None:
        at_least_one("train", self, ("batch_size", "gradient_accumulation_steps", "inner_epochs"))
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be positive, got {self.learning_rate}")
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"train.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")


@dataclass
class DiffExpSection:
    """DiffExp (Chae et al. 2025) exploration, used when exploration: diffexp."""

    cfg_schedule: bool = doc(True, "dynamic guidance: a low scale on the first, noisiest steps")
    low_guidance: list = doc([1.0, 3.0], "range of the per-sample low guidance scale of the early steps")
    low_guidance_fraction: float = doc(0.3, "fraction of the steps (the noisiest) sampled with the low scale")
    prompt_weighting: bool = doc(True, "weight random phrases of the prompt (compel syntax)")
    phrase_weight: list = doc([1.0, 1.5], "range of the random weight given to a phrase")
    weighted_phrases: int = doc(1, "phrases (content words) weighted per prompt")

    def validate(self, config: CommonConfig) -> None:
        if config.exploration == "diffexp":  # the keys are unused otherwise
            self.check()

    def check(self) -> None:
        """Reject empty, reversed or negative ranges with a message naming the key."""
        for key in ("low_guidance", "phrase_weight"):
            bounds = getattr(self, key)
            if len(bounds) != 2 or not all(isinstance(v, (int, float)) for v in bounds):
                raise ConfigError(f"diffexp.{key} must be a [low, high] pair of numbers, got {bounds!r}")
            low, high = bounds
            if low < 0 or high < 0:
                raise ConfigError(f"diffexp.{key} must not be negative, got {bounds!r}")
            if low > high:
                raise ConfigError(f"diffexp.{key} is empty: low {low} > high {high}")
        if self.phrase_weight[1] <= 0:
            raise ConfigError(
                f"diffexp.phrase_weight must include a positive weight, got {self.phrase_weight!r}"
            )
        if not 0 <= self.low_guidance_fraction <= 1:
            raise ConfigError(
                f"diffexp.low_guidance_fraction must be in [0, 1], got {self.low_guidance_fraction}"
            )
        if self.weighted_phrases < 1:
            raise ConfigError(f"diffexp.weighted_phrases must be at least 1, got {self.weighted_phrases}")


@dataclass
class EvalSection:
    """Fixed-noise evaluation: the same prompts and latents at every eval epoch (η = 0)."""

    every: int = doc(2, "evaluate every this many epochs (and before the first and after the last)")
    size: int = doc(64, "images per evaluated prompt set (32 moved the base figures by 0.1 between seeds)")
    prompt_sets: list = doc(
        ["shapes-train", "shapes-heldout"], "prompt sets to evaluate; [] evaluates the training prompts"
    )
    rewards: list = doc(
        ["shapes-oracle"], "rewards scored besides the training reward (e.g. the exact oracle)"
    )
    grid_size: int = doc(8, "images of the first prompt set shown in each samples/epoch-NNNN.png")
    num_steps: int = doc(
        0,
        "DDIM steps of the evaluation samples; 0 = sample.num_steps (train with fewer steps "
        "than you evaluate with by setting both)",
    )

    def validate(self, config: CommonConfig) -> None:
        at_least_one("eval", self, ("every", "size", "grid_size"))
        if self.num_steps < 0:
            raise ConfigError(
                f"eval.num_steps must be 0 (= sample.num_steps) or positive, got {self.num_steps}"
            )


@dataclass
class CommonConfig:
    """What every `diffalign train` run has; ``TrainConfig`` adds one section per method."""

    method: str = doc("ddpo", "optimisation method (a registered name, listed above; each has a preset)")
    exploration: str = doc("none", "online sampling exploration: none | diffexp")
    model: str = doc(
        "shapes", "pipeline: built-in name (shapes, tiny-random), local diffusers folder, or cached hub id"
    )
    reward: str = doc(
        "shapes-clip",
        "reward name (see `diffalign rewards`), or textnorm(NAME[,NAME...]) for TextNorm calibration",
    )
    reward_options: dict = doc({}, "keyword options for the reward, e.g. {checkpoint: /path}")
    prompts: str = doc("shapes-train", "built-in prompt set name or a text file with one prompt per line")
    data: str = doc(
        "",
        "preference data of offline methods (dpo): a registered set (shapes-prefs), a Pick-a-Pic v2 parquet file "
        "or folder of shards, or a JSONL file of {prompt, chosen, rejected} image paths",
    )
    epochs: int = doc(20, "number of epochs (one epoch = sample, reward, update)")
    seed: int = doc(0, "seed for weights init, prompt draws, noise and shuffles")
    output_dir: str = doc("runs/latest", "where metrics, sample grids, checkpoints and the final LoRA go")
    mixed_precision: str = doc("no", "accelerate mixed precision: no | fp16 | bf16")
    save_every: int = doc(1, "write a checkpoint every this many epochs (and at the end)")
    keep_checkpoints: int = doc(2, "how many recent checkpoints to keep")
    tensorboard: bool = doc(True, "also log to tensorboard when it is installed")
    xformers: bool = doc(False, "use xformers attention when available (GPU)")
    gradient_checkpointing: bool = doc(False, "trade compute for memory in the UNet")
    lora: LoraSection = doc(LoraSection, "LoRA adapter")
    sample: SampleSection = doc(SampleSection, "online sampling")
    train: OptimSection = doc(OptimSection, "optimizer and updates")
    diffexp: DiffExpSection = doc(DiffExpSection, "DiffExp exploration")
    eval: EvalSection = doc(EvalSection, "fixed-noise evaluation")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate_keys(self) -> None:
        """The top-level keys (names of models, rewards and prompt sets are checked by ``validate``)."""
        at_least_one("", self, ("epochs", "save_every", "keep_checkpoints"))
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        if self.exploration not in EXPLORATIONS:
            raise ConfigError(
                f"unknown exploration {self.exploration!r}.{_suggest(self.exploration, list(EXPLORATIONS))} "
                f"Choose one of: {', '.join(EXPLORATIONS)}."
            )


if TYPE_CHECKING:  # for readers and type checkers; at run time it is built by train_config_class()
    TrainConfig = CommonConfig

EXPLORATIONS = ("none", "diffexp")
LORA_INITS = ("default", "gaussian")
MIXED_PRECISION = ("no", "fp16", "bf16")
_TRAIN_CONFIG: dict[tuple, type] = {}


def train_config_class() -> type:
    """``TrainConfig``: ``CommonConfig`` with a field per registered method, named after it and
    holding its section (``config.ddpo.clip_range``), built once per set of methods."""
    from diffalign import optim

    methods = [info for info in optim.available() if info.section is not None]
    key = tuple((info.name, info.section) for info in methods)
    if key not in _TRAIN_CONFIG:
        fields = [(info.name, info.section, doc(info.section, info.description)) for info in methods]
        cls = dataclasses.make_dataclass("TrainConfig", fields, bases=(CommonConfig,))
        cls.__module__ = __name__
        cls.__doc__ = "Everything one `diffalign train` run needs: the common sections and one per method."
        _TRAIN_CONFIG[key] = cls
    return _TRAIN_CONFIG[key]


def __getattr__(name: str) -> Any:
    if name == "TrainConfig":  # built from the method registry on first use
        return train_config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def at_least_one(prefix: str, section: Any, keys: tuple[str, ...]) -> None:
    """Refuse any of ``keys`` of ``section`` (config name ``prefix``; "" for the top level) below 1."""
    for key in keys:
        value = getattr(section, key)
        if value < 1:
            raise ConfigError(f"{prefix + '.' if prefix else ''}{key} must be at least 1, got {value}")


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field's type; integers are accepted for float fields."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if annotation is str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):  # the number as written ("007", "1e-3"), not as parsed
            return getattr(value, "text", str(value))
        if value is None:
            raise ConfigError(f"{where} is empty; give a value, or '' for an empty string")
    if annotation is bool and isinstance(value, str) and value.lower() in _YAML_1_1_BOOLEANS:
        return _YAML_1_1_BOOLEANS[value.lower()]
    if annotation is float and isinstance(value, str):
        try:  # a quoted number
            value = float(value)
        except ValueError:
            pass
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {annotation.__name__}, got {value!r} ({type(value).__name__})")
    return _unwrap(value)


def _unwrap(value: Any) -> Any:
    """Plain Python values (``_Int``/``_Float`` back to int/float), so configs dump to YAML as usual."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {key: _unwrap(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unwrap(item) for item in value]
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    types_of = typing.get_type_hints(cls)  # resolves the string annotations of `from __future__`
    for key in values:
        if key not in known:
            raise ConfigError(
                f"unknown config key {prefix + key!r}.{_suggest(key, list(known))} "
                f"Valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(known)}."
            )
    kwargs = {}
    for name, spec in known.items():
        if name not in values:
            continue
        value = values[name]
        section = spec.default_factory if dataclasses.is_dataclass(spec.default_factory) else None
        if section is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix + name!r} is a section; give a mapping, got {value!r}")
            kwargs[name] = _build(section, value, prefix + name + ".")
        else:
            kwargs[name] = _coerce(value, types_of[name], prefix + name)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """``"ddpo.clip_range=2e-4"`` → ``{"ddpo": {"clip_range": 0.0002}}`` (values parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. sample.num_steps=10")
    key, raw = text.split("=", 1)
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({error})") from error
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"override {text!r}: NaN is not a valid value")
    nested: dict = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def preset(method: str) -> dict:
    """The shipped preset for ``method`` (an empty mapping when it has none)."""
    path = resources.files("diffalign").joinpath("presets", f"{method}.yaml")
    if not path.is_file():
        return {}
    return yaml_load(path.read_text("utf-8")) or {}


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from ``path``, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml_load(path.read_text("utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8"
        ) from error
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return data


def default_job() -> dict:
    """What ``diffalign train`` runs when no method is named: ``presets/default.yaml`` over the
    preset of the method it names. Naming a method starts from that method's preset alone."""
    job = preset("default")
    return _merge(method_preset(job.get("method", CommonConfig.method)), job)


def method_preset(method: str) -> dict:
    """The preset of a registered ``method``: its own file (``Method.preset``), else the shipped
    ``presets/<method>.yaml``, else ``{}``."""
    from diffalign import optim

    own = optim.get(method).preset
    return read_yaml(own) if own is not None else preset(method)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults ← method preset (or the default job's, when no method is named) ← YAML file ←
    ``key=value`` overrides, then validated."""
    from diffalign import optim

    user: dict = read_yaml(path) if path else {}
    for text in overrides:
        user = _merge(user, parse_override(text))
    method = user.get("method")
    if method is not None:
        try:
            optim.get(method)
        except optim.MethodError as error:
            raise ConfigError(str(error)) from error
    base = default_job() if method is None else method_preset(method)
    config = _build(train_config_class(), _merge(base, user))
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Checks run before any model is loaded: every section checks its own fields, the chosen
    method what it needs of the rest, and this function what ties sections together and the
    names of the model, rewards and prompt sets (through their registries)."""
    from diffalign import optim, pipeline, prompts, rewards

    try:
        method = optim.get(config.method)
    except optim.MethodError as error:
        raise ConfigError(f"method: {error}") from error
    for spec in dataclasses.fields(config):
        section = getattr(config, spec.name)
        if dataclasses.is_dataclass(section) and hasattr(section, "validate"):
            section.validate(config)
    config.validate_keys()
    try:
        pipeline.check_spec(config.model)
    except pipeline.PipelineError as error:
        raise ConfigError(f"model: {error}") from error
    try:
        rewards.info(config.reward)
    except rewards.RewardError as error:
        raise ConfigError(f"reward: {error}") from error
    for where, name in [("prompts", config.prompts)] + [
        ("eval.prompt_sets", n) for n in config.eval.prompt_sets
    ]:
        try:
            prompts.load_prompts(name)
        except prompts.PromptSetError as error:
            raise ConfigError(f"{where}: {error}") from error
    for name in config.eval.rewards:
        try:
            rewards.info(name)
        except rewards.RewardError as error:
            raise ConfigError(f"eval.rewards: {error}") from error
    unfit, what = prompts.unfit_for(config.eval.prompt_sets, config.model)
    if unfit:  # the rule travels with the prompt set (diffalign.registry.register_prompt_set)
        raise ConfigError(
            f"eval.prompt_sets {unfit} are {what} but model is {config.model!r}: set "
            "eval.prompt_sets=[] (evaluates the training prompts) or name prompt sets for your model, and "
            "eval.rewards=[] unless you have an extra reward to watch"
        )
    if not method.offline:  # an offline method's epoch is its own (dpo.pairs_per_epoch), checked by it
        _check_sampled_epoch(config)
    _check_data(config, method)
    _check_needs(config, method)
    method.validate(config)


def _check_sampled_epoch(config: TrainConfig) -> None:
    """An online epoch's samples split into whole micro-batches and whole accumulated steps."""
    per_epoch = config.sample.batch_size * config.sample.num_batches_per_epoch
    if per_epoch % config.train.batch_size:
        raise ConfigError(
            f"samples per epoch on each process (sample.batch_size x sample.num_batches_per_epoch = {per_epoch}) "
            f"must be divisible by train.batch_size ({config.train.batch_size})"
        )
    micro_batches = per_epoch // config.train.batch_size
    if micro_batches % config.train.gradient_accumulation_steps:
        raise ConfigError(
            f"the {micro_batches} micro-batches per epoch must be divisible by "
            f"train.gradient_accumulation_steps ({config.train.gradient_accumulation_steps}), so that no "
            "half-accumulated gradient crosses an epoch (or a checkpoint)"
        )


def _check_data(config: TrainConfig, method: Any) -> None:
    """Offline methods read ``data``, online ones sample their own images; the name or path must
    exist (a registered set is built, if it is generated, only when training starts)."""
    from diffalign import optim, registry

    offline = [info.name for info in optim.available() if info.offline]
    if not method.offline:
        if config.data:
            raise ConfigError(
                f"data ({config.data!r}) is read by offline methods ({', '.join(offline)}); {method.name} samples "
                "and rewards its own images: remove data, or set method=dpo"
            )
        return
    if not config.data:
        sets = registry.PREFERENCE_SETS.names()
        raise ConfigError(
            f"{method.name} learns from preference pairs: set data to a registered set "
            f"({', '.join(sets) or 'none registered'}), a Pick-a-Pic parquet file or folder, or a JSONL file"
        )
    entry = registry.PREFERENCE_SETS.get(config.data)
    if entry is not None:
        if not entry.fits(config.model):
            raise ConfigError(
                f"data {config.data!r} holds {entry.world} pairs, written for the models "
                f"{', '.join(entry.models or ())}, but model is {config.model!r}"
            )
        return
    if not Path(config.data).expanduser().exists():
        sets = registry.PREFERENCE_SETS.names()
        raise ConfigError(
            f"data {config.data!r} is neither a registered preference set "
            f"({', '.join(sets) or 'none'}){registry.suggestion(config.data, sets)} nor an existing file or folder"
        )


def _check_needs(config: TrainConfig, method: Any) -> None:
    """What the chosen method needs (``Method.needs_*``), with what to do instead."""
    from diffalign import optim, rewards

    if method.needs_stochastic_sampler and config.sample.eta <= 0:
        raise ConfigError(
            f"sample.eta must be > 0 for {method.name}: with eta=0 DDIM is deterministic and has no log-prob"
        )
    if config.sample.stochastic_steps and not method.uses_stochastic_window:
        users = " and ".join(info.name for info in optim.available() if info.uses_stochastic_window)
        raise ConfigError(
            f"sample.stochastic_steps is a window for {users} updates; {method.name} does not use it "
            "(set sample.stochastic_steps=[])"
        )
    if method.needs_lora and not config.lora.enabled:
        raise ConfigError(
            f"{method.name} regularises towards the pre-trained model by switching the LoRA adapter off, so it "
            "needs lora.enabled=true (no second UNet copy is kept in memory)"
        )
    if method.needs_differentiable_reward and not rewards.info(config.reward).differentiable:
        usable = [entry.name for entry in rewards.available() if entry.differentiable]
        any_reward = " or ".join(
            f"method={info.name}"
            for info in optim.available()
            if not info.needs_differentiable_reward and not info.offline
        )
        raise ConfigError(
            f"{method.name} backpropagates through the reward, but {config.reward!r} is not differentiable. "
            f"Differentiable rewards: {', '.join(usable)}. Use {any_reward} for any reward."
        )


def describe(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted key, default, help)`` for every field of ``cls`` (``TrainConfig``): the reference
    shown by ``--help``."""
    cls = train_config_class() if cls is None else cls
    rows = []
    instance = cls()
    for spec in dataclasses.fields(cls):
        value = getattr(instance, spec.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe(type(value), prefix + spec.name + "."))
        else:
            rows.append((prefix + spec.name, repr(value), spec.metadata.get("help", "")))
    return rows


# What a resumed run may change: how long it runs and what it writes, not what it learns.
RESUMABLE_KEYS = (
    "epochs",
    "output_dir",
    "save_every",
    "keep_checkpoints",
    "tensorboard",
    "gradient_checkpointing",
    "eval.every",
    "eval.grid_size",
)


def flatten(config: TrainConfig) -> dict[str, Any]:
    """``{dotted key: value}`` for every field of ``config``."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and key != "reward_options":
                walk(f"{prefix}{key}.", value)
            else:
                flat[prefix + key] = value

    walk("", config.to_dict())
    return flat


def resume_changes(saved: TrainConfig, config: TrainConfig, run: str | Path) -> dict[str, list]:
    """The settings ``config`` changes against the run's ``saved`` config, as ``{key: [old, new]}``.

    Only ``RESUMABLE_KEYS`` may change; any other difference would mix two experiments in one
    run (and make ``config.yaml`` disagree with the optimizer state), so it is refused with the
    list of differences.
    """
    before, after = flatten(saved), flatten(config)
    changes = {key: [before[key], after[key]] for key in before if before[key] != after[key]}
    refused = {key: change for key, change in changes.items() if key not in RESUMABLE_KEYS}
    if refused:
        lines = "\n".join(f"  {key}: {old!r} in the run, {new!r} now" for key, (old, new) in refused.items())
        raise ConfigError(
            f"--resume would change the experiment of the run in {str(run)!r}, so it was refused "
            f"(nothing was changed):\n{lines}\n"
            f"Resume with the run's own settings (`diffalign train --output-dir {run} --resume` loads its "
            f"config.yaml; only {', '.join(RESUMABLE_KEYS)} may change), or start a new run in another output_dir."
        )
    return changes
