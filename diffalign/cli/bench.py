"""``diffalign bench``: the benchmarks of rewards and models in ``diffalign.benchmarks``.

Each subcommand imports its study only when it is used: the studies pull in scipy, scikit-learn,
matplotlib and the models they measure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffalign.cli.args import add_dataclass_arguments, dataclass_values, parse_options, positive_int


def configure(parser: argparse.ArgumentParser) -> None:
    from diffalign.cli import Parser

    actions = parser.add_subparsers(dest="bench_command", required=True, parser_class=Parser)
    actions.add_parser(
        "tia2",
        help="TIA2 (Kim et al. 2024): how well rewards agree with human text-image alignment labels",
        configure=configure_tia2,
    )
    actions.add_parser(
        "shapes-tia",
        help="write shapes-TIA (the built-in TIA2-format set) to a folder, to inspect or share it",
        configure=configure_shapes_tia,
    )
    actions.add_parser(
        "protection",
        help="DiffusionGuard, PhotoGuard and AdvDM against ShapesWorld inpainting edits, scored by the oracle",
        configure=configure_protection,
    )
    actions.add_parser(
        "dnc",
        help="Detect-and-Compare (MuDI, Jang et al. 2024): are all subjects in each image, each once, unmixed?",
        configure=configure_dnc,
    )


def configure_tia2(parser: argparse.ArgumentParser) -> None:
    from diffalign.benchmarks import shapes_tia

    parser.description = (
        "Scores every labelled image with each reward and reports, per subset, the mean over "
        "prompts of AUROC, AUPRC, precision and the authors' truncated average precision at 5/10/25 "
        "(p@k, ap@k), Spearman and Kendall against the labels; writes tia2.json, tia2.csv and the bar chart "
        "tia2.png. With --reference, prints the authors' released per-subset means beside ours on the "
        "prompts both scored. Python: diffalign.benchmarks.tia2.run(...), or tia2.evaluate(reward, data)."
    )
    parser.add_argument(
        "--rewards",
        nargs="+",
        default=["shapes-clip", "shapes-oracle"],
        metavar="NAME",
        help="registered reward names (see `diffalign rewards`; default: shapes-clip shapes-oracle)",
    )
    parser.add_argument(
        "--data",
        default=shapes_tia.NAME,
        help="folder of TIA2 <subset>.json files (images in <subset>/, images/ or beside them), "
        f"one such file, or {shapes_tia.NAME} (built-in, generated on first use; the default)",
    )
    parser.add_argument("--subsets", nargs="+", metavar="SUBSET", help="subsets to evaluate (default: all)")
    parser.add_argument(
        "--option",
        action="append",
        metavar="REWARD.KEY=VALUE",
        help="reward option, e.g. shapes-clip.checkpoint=/path; repeatable",
    )
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per reward call")
    parser.add_argument(
        "--output",
        "-o",
        default="results/tia2",
        help="folder for tia2.json/.csv/.png (default: %(default)s, under the current folder)",
    )
    parser.add_argument("--cache-dir", help="score cache folder (default: <data>/.diffalign-scores/)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write cached scores")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--reference",
        metavar="DIR",
        help="the TextNorm authors' alignment_scores folder (or its parent): print their per-subset means "
        "beside ours on exactly the prompts both scored",
    )
    parser.add_argument(
        "--reference-model",
        action="append",
        default=[],
        metavar="REWARD=MODEL",
        help="which released model a reward stands for (e.g. clip-score=clip), beyond the built-in pairs; repeatable",
    )
    parser.add_argument(
        "--released-means",
        action="store_true",
        help="with --reference: print the released means (and, for --data, check our labels against the "
        "release) without scoring anything",
    )
    parser.set_defaults(handler=cmd_tia2)


def configure_shapes_tia(parser: argparse.ArgumentParser) -> None:
    from diffalign.benchmarks import shapes_tia

    parser.description = (
        "Generates ShapesWorld images with the shipped model and labels them with the exact "
        "detector (plus simulated annotator noise), in TIA2's format. "
        "Python: diffalign.benchmarks.shapes_tia.make(...)."
    )
    parser.add_argument("--output", "-o", required=True, help="new (or empty) folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dataclass_arguments(parser, shapes_tia.ShapesTiaConfig)
    parser.set_defaults(handler=cmd_shapes_tia)


def configure_protection(parser: argparse.ArgumentParser) -> None:
    from diffalign.benchmarks import protection

    parser.description = (
        protection.__doc__.split("\n\n")[0] + " Protects scenes with each method and budget, "
        "edits them with seen and unseen masks, after JPEG and with a second editor, and reports edit success, "
        "PSNR, CLIP directional similarity and cost. Python: diffalign.benchmarks.protection.run(Settings(...))."
    )
    protection.add_arguments(parser)
    parser.set_defaults(handler=cmd_protection)


def configure_dnc(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Detects the subjects' classes in each generated image, compares every detection with every "
        "subject's references, and scores the detection-vs-subject similarity matrix against the "
        "reference-vs-reference one (1 - their Frobenius distance; 0 when the number of detections is not "
        "the number of subjects). Writes dnc.json (summary and one row per image) and dnc.csv. "
        "Python: diffalign.dnc.evaluate_folder(images_dir, subjects, diffalign.dnc.build(scorer), output)."
    )
    parser.add_argument("images", metavar="IMAGES_DIR", help="folder of generated images")
    parser.add_argument(
        "--subject",
        nargs=3,
        action="append",
        required=True,
        metavar=("ID", "CLASS", "FOLDER"),
        help="a subject: its identifier, class word (what the detector looks for) and a folder of its "
        "reference images (NAME.mask.png beside NAME.png = its mask, read and checked, not a reference); "
        "repeat once per subject",
    )
    parser.add_argument(
        "--scorer",
        default="owlv2-dinov2",
        help="registered D&C scorer: owlv2-dinov2 (photographs) or a world's own, e.g. shapes-exact "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="scorer option, e.g. checkpoint=tiny-random, detector=/path/to/owlv2, threshold=0.3; repeatable",
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per scorer call")
    parser.add_argument(
        "--output",
        "-o",
        default="results/dnc",
        help="folder for dnc.json and dnc.csv (default: %(default)s, under the current folder)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace dnc.json and dnc.csv if they exist")
    parser.set_defaults(handler=cmd_dnc)


def cmd_dnc(args: argparse.Namespace) -> int:
    from diffalign import dnc
    from diffalign.subjects import load_subjects

    dnc.check_folder(args.images, args.output, overwrite=args.overwrite)  # before minutes of model loading
    subjects = load_subjects(args.subject)  # validated (identifiers, images, masks) before any model loads
    options = parse_options(args.option)
    scorer = dnc.build(args.scorer, **options)
    report = dnc.evaluate_folder(
        args.images,
        subjects,
        scorer,
        args.output,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        settings={"options": options, "images": str(args.images)},
    )
    print(dnc.format_summary(report))
    print(f"wrote dnc.json and dnc.csv to {args.output}")
    return 0


def cmd_tia2(args: argparse.Namespace) -> int:
    from diffalign.benchmarks import tia2

    models = dict(pair.split("=", 1) for pair in args.reference_model if "=" in pair)
    if len(models) != len(args.reference_model):
        raise tia2.TIA2Error("--reference-model takes REWARD=MODEL, e.g. clip-score=clip")
    if args.released_means:
        if not args.reference:
            raise tia2.TIA2Error("--released-means needs --reference DIR")
        # the label check needs a TIA2 folder: the built-in shapes-TIA has no released counterpart
        data = [] if args.data == tia2.SHAPES_TIA else ["--data", args.data]
        return tia2.main(["--reference", args.reference, *data, "--no-progress"])
    output = Path(args.output)
    result = tia2.run(
        args.rewards,
        args.data,
        options=parse_options(args.option),
        subsets=args.subsets,
        batch_size=args.batch_size,
        cache=not args.no_cache,
        cache_dir=args.cache_dir,
        output=output,
        progress=not args.no_progress,
        reference=args.reference,
        reference_models=models,
    )
    print(tia2.format_table(result))
    if "reference" in result:
        print(tia2.format_comparison(result["reference"]))
    print(f"wrote tia2.json, tia2.csv and tia2.png to {output}")
    return 0


def cmd_shapes_tia(args: argparse.Namespace) -> int:
    from diffalign.benchmarks import shapes_tia

    config = shapes_tia.ShapesTiaConfig(**dataclass_values(args, shapes_tia.ShapesTiaConfig))
    folder = shapes_tia.make(args.output, config, progress=not args.no_progress)
    print(f"wrote shapes-TIA to {folder} (<subset>.json and <subset>/ per subset, README.md)")
    return 0


def cmd_protection(args: argparse.Namespace) -> int:
    from diffalign.benchmarks import protection

    output = Path(args.output) / "protection.json"
    result = protection.run(protection.settings_from(args), output, progress=not args.no_progress)
    print(protection.format_table(result))
    print(f"wrote {output} and its figures beside it")
    return 0
