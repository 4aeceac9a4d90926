"""What the command modules share: argument types, option parsing, and argparse from a dataclass."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from diffalign.errors import DiffalignError


class CommandError(DiffalignError):
    """Arguments that do not fit together (found by a command rather than by argparse)."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number ≥ 0, got {text}")
    return value


def pixel_units(text: str) -> float:
    """A value in [0, 1] pixel units, written as a number or as a fraction of 255 ("8/255")."""
    numerator, slash, denominator = text.partition("/")
    try:
        return float(numerator) / float(denominator) if slash else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"expected a number like 0.0314 or a fraction like 8/255, got {text!r}"
        ) from None


def lora_folder(path: str | None) -> str | None:
    """``--lora``: a folder holding diffusers LoRA weights, checked before any model loads."""
    if path is None:
        return None
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CommandError(
            f"--lora {path!r} is not a folder; give the lora/ folder a `diffalign train` run wrote "
            "(it holds pytorch_lora_weights.safetensors)"
        )
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise CommandError(
            f"--lora {path!r} holds no LoRA weights (*.safetensors); give a run's lora/ folder"
        )
    return str(folder)


def parse_options(pairs: list[str] | None) -> dict:
    """``KEY=VALUE`` options (dotted keys nest, values are YAML) as one mapping."""
    from diffalign import config

    options: dict = {}
    for text in pairs or []:
        options = config._merge(options, config.parse_override(text))
    return options


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per field of the dataclass ``cls`` (``--learning-rate`` for ``learning_rate``),
    typed by the field's default, with its help (``metadata["help"]``) and default. A flag left out
    stays None, so that ``dataclass_values`` passes only what the user set."""
    for spec in dataclasses.fields(cls):
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        flag = "--" + spec.name.replace("_", "-")
        described = spec.metadata.get("help")
        text = (f"{described} (default {default})" if described else f"default {default}").replace("%", "%%")
        if isinstance(default, (tuple, list)):
            parser.add_argument(flag, type=type(default[0]) if default else str, nargs="+", help=text)
        elif isinstance(default, bool):
            parser.add_argument(flag, type=_boolean, metavar="{true,false}", help=text)
        else:
            parser.add_argument(flag, type=type(default), help=text)


def dataclass_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` the user set with ``add_dataclass_arguments``' flags (sequences as the
    default's type: a tuple field gets a tuple)."""
    values = {}
    for spec in dataclasses.fields(cls):
        value = getattr(args, spec.name)
        if value is None:
            continue
        default = spec.default if spec.default is not dataclasses.MISSING else None
        values[spec.name] = tuple(value) if isinstance(default, tuple) else value
    return values


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a command that writes a resumable run folder (``train``, ``personalize``)."""
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key; repeatable"
    )
    parser.add_argument("--output-dir", help="shorthand for --set output_dir=...")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in output_dir from its last checkpoint"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
