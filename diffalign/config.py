"""Training configuration: documented dataclasses, YAML presets, dotted command-line overrides.

A run's configuration is built in layers — the dataclass defaults, the preset of the chosen
method, the user's YAML file, then ``--set section.key=value`` overrides — and validated once,
here, with messages that name the field and suggest the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

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
_Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
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
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def doc(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best at the call sites
    """A dataclass field with its documentation attached (shown by ``diffalign train --help``)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class LoraSection:
    """How the UNet is made trainable."""

    enabled: bool = doc(True, "train a LoRA adapter (peft) instead of the full UNet")
    rank: int = doc(4, "LoRA rank; 4 is DDPO's choice for SD 1.x, enough for reward fine-tuning")
    alpha: float = doc(4.0, "LoRA scale numerator (effective scale alpha/rank)")
    init: str = doc(
        "default",
        "down-projection init (peft's init_lora_weights): default = Kaiming-uniform, gaussian = N(0, 1/rank^2) as "
        "ddpo-pytorch and trl; the up-projection starts at 0 either way, so the model starts unchanged",
    )
    target_modules: list = doc(
        ["to_q", "to_k", "to_v", "to_out.0"], "UNet modules that get LoRA matrices (peft names; attention by default)"
    )


@dataclass
class SampleSection:
    """Online sampling: how the images that get rewarded are drawn."""

    num_steps: int = doc(20, "DDIM steps per image (DDPO used 50 on SD; 20 keeps CPU runs short)")
    eta: float = doc(1.0, "DDIM eta; must be > 0 for policy-gradient methods (the step must be stochastic)")
    guidance_scale: float = doc(5.0, "classifier-free guidance scale")
    negative_prompt: str = doc("", "unconditional prompt for classifier-free guidance")
    batch_size: int = doc(16, "images per sampling batch on each process")
    num_batches_per_epoch: int = doc(2, "sampling batches per epoch; samples/epoch = this x batch_size x processes")
    images_per_prompt: int = doc(
        4, "images sampled per drawn prompt in a batch, so advantages compare images of the same prompt"
    )
    stochastic_steps: list = doc(
        [], "[first, last]: only these denoising steps (0-based, inclusive) are sampled with eta and trained "
        "by ddpo/grpo, the rest run deterministically (MixGRPO's window); [] = every step"
    )
    shared_initial_noise: bool = doc(
        False, "the images of one prompt start from the same x_T (group-shared noise; see benchmarks/gradient_snr.py)"
    )


@dataclass
class OptimSection:
    """The gradient updates shared by every method."""

    batch_size: int = doc(4, "samples per training micro-batch (one optimizer step each, by default)")
    gradient_accumulation_steps: int = doc(
        1, "micro-batches per optimizer step (DDPO also accumulates over the trained timesteps)"
    )
    learning_rate: float = doc(1e-3, "AdamW learning rate (ShapesWorld's small UNet; 5e-3 degrades it; DDPO used 3e-4 for SD 1.5 LoRA)")
    adam_beta1: float = doc(0.9, "AdamW beta1")
    adam_beta2: float = doc(0.999, "AdamW beta2")
    adam_weight_decay: float = doc(1e-4, "AdamW weight decay")
    adam_epsilon: float = doc(1e-8, "AdamW epsilon")
    max_grad_norm: float = doc(1.0, "gradient clipping norm")
    inner_epochs: int = doc(1, "passes over each epoch's samples")
    timestep_fraction: float = doc(0.5, "fraction of each trajectory's trainable steps (all, or sample.stochastic_steps) trained on, a random subset")


@dataclass
class DDPOSection:
    """DDPO (Black et al. 2023): PPO-clip on per-step importance ratios."""

    clip_range: float = doc(1e-2, "PPO clip range on the per-step ratio (DDPO used 1e-4 for SD's 16384-dim latents)")
    adv_clip_max: float = doc(5.0, "advantages are clipped to [-this, this]")
    per_prompt_stat_tracking: bool = doc(True, "normalise rewards per prompt with running statistics")
    stat_buffer_size: int = doc(16, "rewards remembered per prompt for its statistics")
    stat_min_count: int = doc(4, "below this many rewards for a prompt, use the whole batch's statistics")


@dataclass
class GRPOSection:
    """GRPO (Shao et al. 2024; on diffusion: Flow-GRPO, Liu et al. 2025; DanceGRPO, Xue et al. 2025)."""

    clip_range: float = doc(1e-2, "PPO clip range on the per-step ratio (as ddpo.clip_range)")
    adv_clip_max: float = doc(5.0, "advantages are clipped to [-this, this]")
    std: str = doc("group", "advantage scale: group = each prompt group's own std (Flow-GRPO), batch = the batch's std")
    kl_weight: float = doc(0.0, "beta: weight of the per-step KL to the reference (the UNet with the LoRA adapter off)")


@dataclass
class DPOKSection:
    """DPOK (Fan et al. 2023): KL-regularised policy gradient with a value baseline and replay buffer."""

    reward_weight: float = doc(10.0, "alpha: weight of the reward term (advantages are reward minus the value baseline)")
    kl_weight: float = doc(0.01, "beta: weight of the per-step KL to the pre-trained model (the UNet with LoRA off)")
    clip_range: float = doc(1e-2, "clip range of the per-step importance ratio, as in the paper's code")
    buffer_epochs: int = doc(4, "the replay buffer keeps the transitions of this many recent epochs")
    updates_per_epoch: int = doc(8, "policy updates per epoch, each on train.batch_size transitions drawn from the buffer")
    value_learning_rate: float = doc(1e-3, "AdamW learning rate of the value network")
    value_updates_per_epoch: int = doc(8, "value-network updates per epoch, on buffer transitions")
    value_width: int = doc(64, "hidden width of the value network (latents + timestep + pooled text -> expected reward)")


@dataclass
class AlignPropSection:
    """AlignProp (Prabhudesai et al. 2023): backpropagate a differentiable reward through sampling."""

    truncation_steps: int = doc(2, "K: gradients flow through the last K denoising steps (earlier ones run without)")
    random_truncation: bool = doc(
        True, "draw K uniformly from 1..truncation_steps for every update (randomised truncated backprop)"
    )
    checkpoint_unet: bool = doc(True, "gradient-checkpoint every UNet call with gradients (memory ~ one call)")
    reward_scale: float = doc(1.0, "the loss is -reward_scale x mean reward")


@dataclass
class ReFLSection:
    """ReFL (Xu et al. 2023): a differentiable reward read from the one-step prediction x̂_0 at a drawn step."""

    first_step: int = doc(15, "first denoising step (0-based) the gradient step is drawn from (the paper: the "
                          "last quarter of the chain)")
    last_step: int = doc(19, "last denoising step (0-based, inclusive) the gradient step is drawn from; "
                         "< sample.num_steps")
    checkpoint_unet: bool = doc(True, "gradient-checkpoint the UNet call with gradients")
    reward_scale: float = doc(1.0, "the loss is -reward_scale x mean reward")


@dataclass
class DiffExpSection:
    """DiffExp (Chae et al. 2025) exploration, used when exploration: diffexp."""

    cfg_schedule: bool = doc(True, "dynamic guidance: a low scale on the first, noisiest steps")
    low_guidance: list = doc([1.0, 3.0], "range of the per-sample low guidance scale of the early steps")
    low_guidance_fraction: float = doc(0.3, "fraction of the steps (the noisiest) sampled with the low scale")
    prompt_weighting: bool = doc(True, "weight random phrases of the prompt (compel syntax)")
    phrase_weight: list = doc([1.0, 1.5], "range of the random weight given to a phrase")
    weighted_phrases: int = doc(1, "phrases (content words) weighted per prompt")


@dataclass
class EvalSection:
    """Fixed-noise evaluation: the same prompts and latents at every eval epoch (η = 0)."""

    every: int = doc(2, "evaluate every this many epochs (and before the first and after the last)")
    size: int = doc(64, "images per evaluated prompt set (32 moved the base figures by 0.1 between seeds)")
    prompt_sets: list = doc(
        ["shapes-train", "shapes-heldout"], "prompt sets to evaluate; [] evaluates the training prompts"
    )
    rewards: list = doc(["shapes-oracle"], "rewards scored besides the training reward (e.g. the exact oracle)")
    grid_size: int = doc(8, "images of the first prompt set shown in each samples/epoch-NNNN.png")
    num_steps: int = doc(0, "DDIM steps of the evaluation samples; 0 = sample.num_steps (train with fewer steps "
                         "than you evaluate with by setting both)")


@dataclass
class TrainConfig:
    """Everything one `diffalign train` run needs."""

    method: str = doc("ddpo", "optimisation method: ddpo | grpo | dpok | alignprop | refl")
    exploration: str = doc("none", "online sampling exploration: none | diffexp")
    model: str = doc("shapes", "pipeline: built-in name (shapes, tiny-random), local diffusers folder, or cached hub id")
    reward: str = doc(
        "shapes-clip", "reward name (see `diffalign rewards`), or textnorm(NAME[,NAME...]) for TextNorm calibration"
    )
    reward_options: dict = doc({}, "keyword options for the reward, e.g. {checkpoint: /path}")
    prompts: str = doc("shapes-train", "built-in prompt set name or a text file with one prompt per line")
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
    ddpo: DDPOSection = doc(DDPOSection, "DDPO")
    grpo: GRPOSection = doc(GRPOSection, "GRPO")
    dpok: DPOKSection = doc(DPOKSection, "DPOK")
    alignprop: AlignPropSection = doc(AlignPropSection, "AlignProp")
    refl: ReFLSection = doc(ReFLSection, "ReFL")
    diffexp: DiffExpSection = doc(DiffExpSection, "DiffExp exploration")
    eval: EvalSection = doc(EvalSection, "fixed-noise evaluation")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


METHODS = ("ddpo", "grpo", "dpok", "alignprop", "refl")
EXPLORATIONS = ("none", "diffexp")
POLICY_GRADIENT_METHODS = ("ddpo", "grpo", "dpok")
LORA_INITS = ("default", "gaussian")
MIXED_PRECISION = ("no", "fp16", "bf16")


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
    return _merge(preset(job.get("method", TrainConfig.method)), job)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults ← method preset (or the default job's, when no method is named) ← YAML file ←
    ``key=value`` overrides, then validated."""
    user: dict = read_yaml(path) if path else {}
    for text in overrides:
        user = _merge(user, parse_override(text))
    method = user.get("method")
    base = default_job() if method is None else preset(method)
    method = base.get("method", TrainConfig.method) if method is None else method
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}.{_suggest(str(method), list(METHODS))} Methods: {', '.join(METHODS)}.")
    config = _build(TrainConfig, _merge(base, user))
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Cross-field checks, run before any model is loaded."""
    from diffalign import pipeline, prompts, rewards

    try:
        pipeline.check_spec(config.model)
    except pipeline.PipelineError as error:
        raise ConfigError(f"model: {error}") from error
    if config.mixed_precision not in MIXED_PRECISION:
        raise ConfigError(
            f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {config.mixed_precision!r}"
        )
    try:
        rewards.info(config.reward)
    except rewards.RewardError as error:
        raise ConfigError(f"reward: {error}") from error
    for where, name in [("prompts", config.prompts)] + [("eval.prompt_sets", n) for n in config.eval.prompt_sets]:
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
    positive = {
        "epochs": config.epochs,
        "save_every": config.save_every,
        "keep_checkpoints": config.keep_checkpoints,
        "eval.every": config.eval.every,
        "eval.size": config.eval.size,
        "eval.grid_size": config.eval.grid_size,
        "lora.rank": config.lora.rank,
        "sample.num_steps": config.sample.num_steps,
        "sample.batch_size": config.sample.batch_size,
        "sample.num_batches_per_epoch": config.sample.num_batches_per_epoch,
        "train.batch_size": config.train.batch_size,
        "train.gradient_accumulation_steps": config.train.gradient_accumulation_steps,
        "train.inner_epochs": config.train.inner_epochs,
        "sample.images_per_prompt": config.sample.images_per_prompt,
    }
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if config.eval.num_steps < 0:
        raise ConfigError(f"eval.num_steps must be 0 (= sample.num_steps) or positive, got {config.eval.num_steps}")
    if config.train.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate must be positive, got {config.train.learning_rate}")
    if not 0 < config.train.timestep_fraction <= 1:
        raise ConfigError(f"train.timestep_fraction must be in (0, 1], got {config.train.timestep_fraction}")
    if config.exploration not in EXPLORATIONS:
        raise ConfigError(
            f"unknown exploration {config.exploration!r}.{_suggest(config.exploration, list(EXPLORATIONS))} "
            f"Choose one of: {', '.join(EXPLORATIONS)}."
        )
    if config.exploration == "diffexp":
        from diffalign.diffexp import ExplorationError, check_section

        try:
            check_section(config.diffexp)
        except ExplorationError as error:
            raise ConfigError(str(error)) from error
    if config.method in POLICY_GRADIENT_METHODS and config.sample.eta <= 0:
        raise ConfigError(
            f"sample.eta must be > 0 for {config.method}: with eta=0 DDIM is deterministic and has no log-prob"
        )
    _validate_stochastic_steps(config)
    if config.sample.batch_size % config.sample.images_per_prompt:
        raise ConfigError(
            f"sample.batch_size ({config.sample.batch_size}) must be divisible by "
            f"sample.images_per_prompt ({config.sample.images_per_prompt})"
        )
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
    if config.ddpo.clip_range <= 0 or config.ddpo.adv_clip_max <= 0:
        raise ConfigError("ddpo.clip_range and ddpo.adv_clip_max must be positive")
    if config.lora.init not in LORA_INITS:
        raise ConfigError(
            f"unknown lora.init {config.lora.init!r}.{_suggest(config.lora.init, list(LORA_INITS))} "
            f"Choose one of: {', '.join(LORA_INITS)}."
        )
    _validate_grpo(config)
    _warn_if_clip_is_inert(config)
    _validate_dpok(config)
    if config.method in ("alignprop", "refl"):
        _validate_differentiable(config)
    if config.method == "alignprop":
        _validate_alignprop(config)
    if config.method == "refl":
        _validate_refl(config)


def _validate_grpo(config: TrainConfig) -> None:
    section = config.grpo
    if section.clip_range <= 0 or section.adv_clip_max <= 0:
        raise ConfigError("grpo.clip_range and grpo.adv_clip_max must be positive")
    if section.std not in ("group", "batch"):
        raise ConfigError(f"grpo.std must be group or batch, got {section.std!r}")
    if section.kl_weight < 0:
        raise ConfigError(f"grpo.kl_weight must not be negative, got {section.kl_weight}")
    if config.method == "grpo":
        if config.sample.images_per_prompt < 2:
            raise ConfigError(
                "grpo compares the images of one prompt with each other: sample.images_per_prompt must be at "
                f"least 2, got {config.sample.images_per_prompt}"
            )
        if section.kl_weight > 0 and not config.lora.enabled:
            raise ConfigError(
                "grpo.kl_weight > 0 regularises towards the model with the LoRA adapter off, so it needs "
                "lora.enabled=true"
            )


def _warn_if_clip_is_inert(config: TrainConfig) -> None:
    """PPO's clip only acts on samples trained after the policy has moved: with one pass over the
    epoch (train.inner_epochs = 1) and a single optimiser step per epoch, every ratio is exactly 1
    and the run is plain REINFORCE. Allowed (it is a valid choice), but said."""
    if config.method not in ("ddpo", "grpo") or config.train.inner_epochs > 1:
        return
    per_epoch = config.sample.batch_size * config.sample.num_batches_per_epoch
    if config.train.batch_size * config.train.gradient_accumulation_steps >= per_epoch:
        warnings.warn(
            f"{config.method}: train.gradient_accumulation_steps makes one optimiser step per epoch and "
            "train.inner_epochs is 1, so every importance ratio is exactly 1 and the PPO clip never acts: "
            "this run is plain REINFORCE. Set train.inner_epochs > 1 (or fewer accumulation steps) to use the clip.",
            stacklevel=3,
        )


def _validate_stochastic_steps(config: TrainConfig) -> None:
    window, steps = config.sample.stochastic_steps, config.sample.num_steps
    if not window:
        return
    if config.method not in ("ddpo", "grpo"):
        raise ConfigError(
            f"sample.stochastic_steps is a window for ddpo and grpo updates; {config.method} does not use it "
            "(set sample.stochastic_steps=[])"
        )
    if (len(window) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in window)
            or not 0 <= window[0] <= window[1] < steps):
        raise ConfigError(
            f"sample.stochastic_steps must be [first, last] with 0 <= first <= last < sample.num_steps ({steps}), "
            f"got {window}; set sample.stochastic_steps=[] to make every step stochastic"
        )


def _validate_differentiable(config: TrainConfig) -> None:
    from diffalign import rewards

    if not rewards.info(config.reward).differentiable:
        usable = [entry.name for entry in rewards.available() if entry.differentiable]
        raise ConfigError(
            f"{config.method} backpropagates through the reward, but {config.reward!r} is not differentiable. "
            f"Differentiable rewards: {', '.join(usable)}. Use method=ddpo or method=dpok for any reward."
        )


def _validate_refl(config: TrainConfig) -> None:
    section, steps = config.refl, config.sample.num_steps
    if not 0 <= section.first_step <= section.last_step < steps:
        raise ConfigError(
            f"refl.first_step..refl.last_step must be a window of denoising steps 0..{steps - 1} "
            f"(sample.num_steps={steps}), got {section.first_step}..{section.last_step}"
        )
    if section.reward_scale <= 0:
        raise ConfigError(f"refl.reward_scale must be positive, got {section.reward_scale}")


def _validate_alignprop(config: TrainConfig) -> None:
    steps = config.alignprop.truncation_steps
    if not 1 <= steps <= config.sample.num_steps:
        raise ConfigError(
            f"alignprop.truncation_steps must be between 1 and sample.num_steps ({config.sample.num_steps}), got {steps}"
        )
    if config.alignprop.reward_scale <= 0:
        raise ConfigError(f"alignprop.reward_scale must be positive, got {config.alignprop.reward_scale}")


def _validate_dpok(config: TrainConfig) -> None:
    section = config.dpok
    if config.method == "dpok" and not config.lora.enabled:
        raise ConfigError(
            "dpok regularises towards the pre-trained model by switching the LoRA adapter off, so it needs "
            "lora.enabled=true (no second UNet copy is kept in memory)"
        )
    for key in ("buffer_epochs", "updates_per_epoch", "value_updates_per_epoch", "value_width"):
        if getattr(section, key) < 1:
            raise ConfigError(f"dpok.{key} must be at least 1, got {getattr(section, key)}")
    for key in ("reward_weight", "clip_range", "value_learning_rate"):
        if getattr(section, key) <= 0:
            raise ConfigError(f"dpok.{key} must be positive, got {getattr(section, key)}")
    if section.kl_weight < 0:
        raise ConfigError(f"dpok.kl_weight must not be negative, got {section.kl_weight}")


def describe(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted key, default, help)`` for every field: the reference shown by ``--help``."""
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
