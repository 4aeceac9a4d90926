"""The `diffalign` command: a thin shell over the Python API.

Each subcommand parses its arguments and makes one call into the library; anything it does
can be done from Python with the function named in its help. One module per command group:

- ``train``: ``diffalign train``;
- ``personalize``: ``diffalign personalize``;
- ``images``: ``diffalign sample`` and ``diffalign score``;
- ``rewards``: ``diffalign rewards``;
- ``bench``: ``diffalign bench tia2 | shapes-tia | protection``;
- ``protection``: ``diffalign protect``, ``edit`` and ``app``;
- ``data``: ``diffalign data filter`` (FiFA);

and the groups a world registers (``diffalign.registry.register_command``), such as ShapesWorld's
``diffalign shapes`` (``diffalign/shapes/cli.py``). Building the command tree imports none of
them: a command's module is imported and its arguments added only when that command is parsed
or its help is shown (``Parser``), and each handler imports the library parts it calls. So
``diffalign --help`` and ``diffalign rewards`` load neither torch nor the studies.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from diffalign.errors import DiffalignError, describe_os_error

# name -> ("module:function" that adds the command's arguments and handler, one-line help).
# World groups (``diffalign.registry.COMMANDS``) are listed after ``score``.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "train:configure",
        "fine-tune a pipeline's UNet or transformer (LoRA) on a reward or preference pairs",
    ),
    "personalize": (
        "personalize:configure",
        "personalise a pipeline on a few subjects' images (DreamBooth-LoRA, MuDI's Seg-Mix)",
    ),
    "sample": ("images:configure_sample", "generate images from a pipeline (+ LoRA)"),
    "score": ("images:configure_score", "score a folder of images, or generations from a prompt file"),
    "bench": ("bench:configure", "benchmarks of rewards and models"),
    "protect": (
        "protection:configure_protect",
        "protect a region of an image against inpainting edits (DiffusionGuard and baselines)",
    ),
    "edit": (
        "protection:configure_edit",
        "inpainting edit: keep the masked region of an image and repaint the rest from a prompt",
    ),
    "app": (
        "protection:configure_app",
        "web app: protect an image, download it, and compare edits of the original and the protected one",
    ),
    "rewards": ("rewards:configure", "list the registered rewards"),
    "data": ("data:configure", "preference-data tools: filter (FiFA)"),
}


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose arguments are added on first use.

    ``configure(parser)`` runs the first time the parser parses or formats its help, so a command
    tree of many commands costs nothing until one of them is used; an ``epilog`` may be a
    function, called only when the help is shown (listings that import registries).
    """

    def __init__(self, *args, configure: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._configure = configure

    def configured(self) -> Parser:
        if self._configure is not None:
            configure, self._configure = self._configure, None
            configure(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        self.configured()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.configured()
        return super().format_usage()

    def format_help(self) -> str:
        self.configured()
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def configure_from(target: str, package: str = __name__) -> Callable[[argparse.ArgumentParser], None]:
    """``configure`` for ``"module:function"`` (relative to ``package``), imported when it runs."""
    module, _, function = target.partition(":")
    name = module if "." in module else f"{package}.{module}"
    return lambda parser: getattr(importlib.import_module(name), function)(parser)


def build_parser() -> argparse.ArgumentParser:
    from diffalign import registry

    parser = Parser(
        prog="diffalign", description="Align text-to-image diffusion models with rewards and human feedback."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    names = list(COMMANDS)
    worlds = {group.name: group for group in registry.COMMANDS}
    for name in [*names[: names.index("score") + 1], *worlds, *names[names.index("score") + 1 :]]:
        if name in worlds:
            group = worlds[name]
            commands.add_parser(name, help=group.help, configure=configure_from(f"{group.module}:configure"))
        else:
            target, text = COMMANDS[name]
            commands.add_parser(name, help=text, configure=configure_from(target))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Faults in the input or the environment (``DiffalignError``, and ``OSError``
    from the machine: a full disk, a read-only folder) are one line on stderr and exit code 2;
    anything else is a bug in diffalign and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except DiffalignError as error:
        message = str(error)
    except OSError as error:
        message = describe_os_error(error)
    print(f"diffalign {args.command}: error: {message}", file=sys.stderr)
    return 2


__all__ = ["COMMANDS", "Parser", "build_parser", "main"]
