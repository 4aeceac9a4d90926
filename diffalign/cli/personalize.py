"""``diffalign personalize``: DreamBooth-LoRA on a few subjects, with MuDI's augmentations
(``diffalign.personalize.personalize``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffalign.cli.args import CommandError, add_run_arguments
from diffalign.errors import DiffalignError, describe_os_error


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Personalise a Stable Diffusion pipeline on one or more subjects (DreamBooth with LoRA; MuDI's Seg-Mix "
        "with mode=segmix). Each subject is a folder of a few images, an identifier and a class word."
    )
    parser.epilog = epilog
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("config", nargs="?", help="YAML config file (keys below)")
    parser.add_argument(
        "--subject",
        nargs=3,
        action="append",
        metavar=("IDENTIFIER", "CLASS", "FOLDER"),
        help="a subject: rare identifier, class word, folder of its images (NAME.mask.png = mask); repeatable, "
        "e.g. --subject olis toy photos/toy --subject hta dog photos/dog",
    )
    parser.add_argument("--subjects", metavar="NAME", help="a registered subject set (listed below)")
    add_run_arguments(parser)
    parser.set_defaults(handler=cmd_personalize)


def epilog() -> str:
    """Modes, subject sets and config keys, each read from where it is defined."""
    from diffalign import config, registry
    from diffalign.personalize import PersonalizeConfig

    sets = "\n".join(
        f"  {entry.name:<20} {entry.description} (models: {', '.join(entry.models or ('any',))})"
        for entry in registry.SUBJECT_SETS
    )
    keys = "\n".join(
        f"  {key:<26} {default:<28} {text}" for key, default, text in config.describe(PersonalizeConfig)
    )
    return (
        "modes (mode=...):\n"
        "  dreambooth  DreamBooth-LoRA on all subjects at once (Ruiz et al. 2023), the baseline\n"
        "  cutmix      + Cut-Mix: halves of two subjects' images side by side, captioned with both tokens\n"
        "  segmix      + Seg-Mix (MuDI, Jang et al. 2024): segmented subjects pasted together; needs masks\n"
        "              (NAME.mask.png) or segmentation.checkpoint=CLIPSEG to make them\n\n"
        f"subject sets (--subjects NAME; with no subjects, the first one registered for the model):\n"
        f"{sets or '  (none registered)'}\n\n"
        f"config keys (YAML file and --set key=value):\n{keys}\n\n"
        "Python: diffalign.personalize.personalize(diffalign.personalize.load_personalize_config(path, overrides))"
    )


def overrides(args: argparse.Namespace) -> list[str]:
    """``--subject``, ``--subjects`` and ``--output-dir`` as ``key=value`` overrides after ``--set``."""
    import json

    given = list(args.set or [])
    if args.subject and args.subjects:
        raise CommandError("give --subject folders or a --subjects set, not both")
    if args.subject:
        items = [{"identifier": i, "class_word": c, "folder": f} for i, c, f in args.subject]
        given.append(f"subjects={json.dumps(items)}")  # JSON is YAML
    if args.subjects:
        given.append(f"subject_set={json.dumps(args.subjects)}")
    if args.output_dir:
        given.append(f"output_dir={json.dumps(args.output_dir)}")
    return given


def run_config(args: argparse.Namespace):
    """The run's config: with ``--resume`` and no file, the run's own ``config.yaml``."""
    from diffalign import config
    from diffalign.personalize import PersonalizeConfig, load_personalize_config

    given = overrides(args)
    path = args.config
    if args.resume and path is None:
        merged: dict = {}
        for text in given:
            merged = config._merge(merged, config.parse_override(text))
        output_dir = str(merged.get("output_dir", PersonalizeConfig.output_dir))
        path = Path(output_dir) / "config.yaml"
        if not path.is_file():
            raise CommandError(
                f"--resume: there is no run to resume in {output_dir!r} (no config.yaml there)"
            )
    return load_personalize_config(path, given)


def cmd_personalize(args: argparse.Namespace) -> int:
    from diffalign.cli.train import kept
    from diffalign.personalize import personalize

    config = run_config(args)
    try:
        result = personalize(config, resume=args.resume, progress=not args.no_progress)
    except (DiffalignError, OSError) as error:
        text = describe_os_error(error) if isinstance(error, OSError) else str(error)
        raise CommandError(
            text + kept(config.output_dir, error).replace("diffalign train", "diffalign personalize")
        ) from error
    if not result.main_process:
        return 0
    last = result.history[-1] if result.history else {}
    out = result.output_dir
    print(f"done: step {last.get('step', 0)}, last loss {last.get('loss', float('nan')):.4g}")
    print(
        f"grids: {out / 'samples'} (step-NNNN.png); curve: {out / 'loss_curve.png'}; metrics: {out / 'metrics.jsonl'}"
    )
    print(f"LoRA: {result.lora_dir} (diffusers: pipe.load_lora_weights({str(result.lora_dir)!r}))")
    return 0
