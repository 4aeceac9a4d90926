"""``diffalign train``: fine-tune a pipeline with a reward (``diffalign.train.train``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffalign.cli.args import CommandError, add_run_arguments
from diffalign.errors import DiffalignError, describe_os_error


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Fine-tune a Stable Diffusion pipeline (1.x/2.x: its UNet; 3: its transformer), with LoRA, to maximise "
        "a reward or to fit preference pairs. With no arguments: the default job (below)."
    )
    parser.epilog = epilog
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("config", nargs="?", help="YAML config file (keys below)")
    add_run_arguments(parser)
    parser.set_defaults(handler=cmd_train)


def epilog() -> str:
    """The reference below ``diffalign train --help``: methods, explorations, rewards, prompt sets,
    config keys, each read from its registry."""
    from diffalign import config, optim
    from diffalign import prompts as prompt_sets
    from diffalign.cli.rewards import reward_table

    methods = "\n".join(f"  {info.name:<10} {info.description}" for info in optim.available())
    keys = "\n".join(f"  {key:<36} {default:<22} {text}" for key, default, text in config.describe())
    return (
        "default job (no method named): diffalign/presets/default.yaml, AlignProp + DiffExp on shapes-clip,\n"
        "  20 epochs (docs/studies/default-job.md)\n\n"
        "methods (method=...; each starts from its preset in diffalign/presets/<method>.yaml):\n"
        f"{methods}\n\n"
        "exploration (exploration=...):\n"
        "  none       sample with the fixed guidance scale and the prompt as written\n"
        "  diffexp    DiffExp (Chae et al. 2025): low guidance on early steps + random phrase weights (compel)\n\n"
        f"rewards:\n{reward_table()}\n\n"
        f"prompt sets:\n  {', '.join(prompt_sets.builtin_names())} (or a .txt file, one prompt per line)\n\n"
        f"config keys (YAML file and --set key=value):\n{keys}\n\n"
        "Python: diffalign.train.train(diffalign.config.load_config(path, overrides))"
    )


def run_config(args: argparse.Namespace):
    """The config of ``diffalign train``: with ``--resume`` and no file, the run's own config.yaml."""
    from diffalign import config

    overrides = list(args.set or [])
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    path = args.config
    if args.resume and path is None:
        given: dict = {}
        for text in overrides:
            given = config._merge(given, config.parse_override(text))
        output_dir = str(given.get("output_dir", config.CommonConfig.output_dir))
        path = Path(output_dir) / "config.yaml"
        if not path.is_file():
            raise CommandError(
                f"--resume: there is no run to resume in {output_dir!r} (no config.yaml there)"
            )
    return config.load_config(path, overrides)


def kept(output_dir: str, error: BaseException) -> str:
    """What a failed training run left intact, said after its error."""
    from diffalign import checkpoint
    from diffalign.optim import TrainingDiverged

    folder = Path(output_dir) / "checkpoints"
    try:
        latest = checkpoint.latest(folder) if folder.is_dir() else None
    except checkpoint.CheckpointError:
        latest = None
    if latest is not None:
        return (
            f"\nkept: the last complete checkpoint, {latest.name}, in {folder}; continue with "
            f"`diffalign train --output-dir {output_dir} --resume`"
        )
    if isinstance(error, (OSError, TrainingDiverged)):
        return f"\nkept: no checkpoint had been written yet in {output_dir}"
    return ""


def cmd_train(args: argparse.Namespace) -> int:
    from diffalign.train import train

    config = run_config(args)
    try:
        result = train(config, resume=args.resume, progress=not args.no_progress)
    except (DiffalignError, OSError) as error:
        text = describe_os_error(error) if isinstance(error, OSError) else str(error)
        raise CommandError(text + kept(config.output_dir, error)) from error
    if not result.main_process:
        return 0
    from diffalign import optim

    last = result.history[-1]
    key = "implicit_accuracy" if optim.get(config.method).offline else "reward_mean"
    print(f"done: epoch {last.get('epoch', 0)}, last {key} {last.get(key, float('nan')):.4g}")
    # An offline method trains on preference pairs: the configured reward is scored, not trained on.
    print(result.summary(None if optim.get(config.method).offline else config.reward))
    return 0
