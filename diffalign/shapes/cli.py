"""``diffalign shapes``: retrain ShapesWorld's shipped models and build its preference set
(registered by ``diffalign.shapes``).

Each subcommand's arguments come from its recipe's config dataclass and are added, with the
recipe's module, only when the subcommand is used.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffalign.cli import Parser
from diffalign.cli.args import add_dataclass_arguments, dataclass_values


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="shapes_command", required=True, parser_class=Parser)
    actions.add_parser(
        "train",
        help="train ShapesWorld's CLIP, VAE and UNet from scratch (reproduces the shipped weights)",
        configure=configure_train,
    )
    actions.add_parser(
        "train-inpaint",
        help="fine-tune the shipped ShapesWorld UNet into a 9-channel inpainting UNet (shapes-inpaint)",
        configure=configure_train_inpaint,
    )
    actions.add_parser(
        "train-negclip",
        help="fine-tune the shipped ShapesWorld CLIP with hard negatives (the reward shapes-negclip)",
        configure=configure_train_negclip,
    )
    actions.add_parser(
        "train-vae-marked",
        help="fine-tune the shipped ShapesWorld VAE to draw marked shapes (shapes-vae-marked, for MuDI)",
        configure=configure_train_vae_marked,
    )
    actions.add_parser(
        "train-flow",
        help="train the Stable Diffusion 3-style ShapesWorld model (shapes-flow) with rectified flow matching",
        configure=configure_train_flow,
    )
    actions.add_parser(
        "prefs",
        help="build (once, into the cache) or show the preference set shapes-prefs and its figures",
        configure=configure_prefs,
    )


def configure_train(parser: argparse.ArgumentParser) -> None:
    from diffalign.shapes.training import ShapesTrainingConfig

    parser.description = (
        "Renders train-split scenes, trains CLIP contrastively, the VAE, then the UNet on VAE "
        "latents conditioned on the CLIP text tower, and saves <output>/pipeline and <output>/clip. "
        "Python: diffalign.shapes.training.train_all(config, output)."
    )
    parser.add_argument(
        "--output", "-o", required=True, help="folder for pipeline/, clip/ and training_report.json"
    )
    parser.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16, as shipped)")
    add_dataclass_arguments(parser, ShapesTrainingConfig)
    parser.set_defaults(handler=train)


def configure_train_inpaint(parser: argparse.ArgumentParser) -> None:
    from diffalign.shapes.inpaint_training import InpaintTrainingConfig

    parser.description = (
        "Renders train-split scenes and fine-tunes the shipped UNet on random masks "
        "(SD-inpainting's recipe, scaled down); saves <output>/unet (what ships), <output>/pipeline "
        "(a standalone diffusers inpainting folder) and training_report.json with the editor's oracle "
        "scores. Rerun the same command to resume an interrupted run. "
        "Python: diffalign.shapes.inpaint_training.train_inpainting(config, output)."
    )
    parser.add_argument(
        "--output", "-o", required=True, help="folder for unet/, pipeline/ and training_report.json"
    )
    parser.add_argument(
        "--install",
        action="store_true",
        help="then copy <output>/unet into the package, as the model `shapes-inpaint` loads",
    )
    parser.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16, as shipped)")
    add_dataclass_arguments(parser, InpaintTrainingConfig)
    parser.set_defaults(handler=train_inpaint)


def configure_train_negclip(parser: argparse.ArgumentParser) -> None:
    from diffalign.shapes.negclip import NegClipConfig

    parser.description = (
        "Renders fresh train-split scenes and fine-tunes the shipped CLIP with NegCLIP's loss "
        "plus a caption-against-its-negative term: every caption's hard negative (converse relation, "
        "swapped colours or shapes, the other count) joins the batch's texts. Saves <output>/clip and "
        "training_report.json with the word-order accuracies before and after (the shipped model: "
        "about 20 min on one CPU thread). Python: diffalign.shapes.negclip.train_negclip(config, output)."
    )
    parser.add_argument(
        "--output", "-o", required=True, help="a new folder for clip/ and training_report.json"
    )
    parser.add_argument(
        "--install",
        action="store_true",
        help="then copy <output>/clip into the package, as the model `shapes-negclip` loads",
    )
    parser.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16, as shipped)")
    add_dataclass_arguments(parser, NegClipConfig)
    parser.set_defaults(handler=train_negclip)


def configure_train_vae_marked(parser: argparse.ArgumentParser) -> None:
    from diffalign.shapes.marked_vae import MarkedVaeConfig

    parser.description = (
        "Fine-tunes the shipped VAE on marked and plain shapes, keeping plain shapes' latents where they were "
        "(the UNet's latent space), and writes OUTPUT/vae and OUTPUT/training_report.json; --install makes it "
        "the VAE shapes-vae-marked that ShapesWorld's subject sets draw with."
    )
    parser.add_argument(
        "--output", "-o", required=True, help="a new folder for vae/ and training_report.json"
    )
    parser.add_argument("--install", action="store_true", help="copy the result into the package's weights")
    parser.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16, as shipped)")
    add_dataclass_arguments(parser, MarkedVaeConfig)
    parser.set_defaults(handler=train_vae_marked)


def train_vae_marked(args: argparse.Namespace) -> int:
    from diffalign import outputs
    from diffalign.shapes import assets, marked_vae

    output = Path(args.output)
    outputs.check_new_run_folder(output)
    config = marked_vae.MarkedVaeConfig(**dataclass_values(args, marked_vae.MarkedVaeConfig))
    report = marked_vae.train_marked_vae(config, output, fp16=not args.fp32)
    print(
        f"fine-tuned the ShapesWorld VAE on marked shapes into {output / 'vae'} ({report['train_seconds'] / 60:.1f} min)"
    )
    for name, value in report["after"].items():
        print(f"  {name}: {report['before'].get(name, 0.0):.3f} -> {value:.3f}")
    if args.install:
        marked_vae.install(output / "vae")
        print(f"installed {output / 'vae'} as shapes-vae-marked ({assets.MARKED_VAE_DIR})")
    return 0


def configure_train_flow(parser: argparse.ArgumentParser) -> None:
    from diffalign.shapes.flow_model import FlowTrainingConfig

    parser.description = (
        "Trains an MM-DiT transformer with rectified flow matching on ShapesWorld scenes, with the shipped VAE "
        "and the ShapesWorld CLIP and NegCLIP text towers as its two text encoders, and writes OUTPUT/pipeline "
        "(a StableDiffusion3Pipeline folder) and OUTPUT/training_report.json; --install makes it the model "
        "shapes-flow. About 25 minutes on 2 CPU cores with the defaults (the shipped weights)."
    )
    parser.add_argument(
        "--output", "-o", required=True, help="a new folder for pipeline/ and training_report.json"
    )
    parser.add_argument("--install", action="store_true", help="copy the result into the package's weights")
    parser.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16, as shipped)")
    add_dataclass_arguments(parser, FlowTrainingConfig)
    parser.set_defaults(handler=train_flow)


def train_flow(args: argparse.Namespace) -> int:
    from diffalign import outputs
    from diffalign.shapes import assets, flow_model

    output = Path(args.output)
    outputs.check_new_run_folder(output)
    config = flow_model.FlowTrainingConfig(**dataclass_values(args, flow_model.FlowTrainingConfig))
    report = flow_model.train_flow_model(config, output, fp16=not args.fp32)
    print(
        f"trained the ShapesWorld flow model into {output / 'pipeline'} ({report['train_seconds'] / 60:.1f} min, "
        f"final loss {report['losses'][-1]:.4f})"
    )
    if args.install:
        flow_model.install(output / "pipeline")
        print(f"installed {output / 'pipeline'} as the model shapes-flow ({assets.FLOW_DIR})")
    return 0


def configure_prefs(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Generates shapes-prefs (Pick-a-Pic-format parquet shards of simulated-annotator pairs of the "
        "shipped model's images, with the oracle's ground truth) into the cache, or into --output, unless "
        "it is there already; then prints where it is and its figures. "
        "Python: diffalign.shapes.prefs.cached_path() or build(folder, pairs=N)."
    )
    parser.add_argument("--rebuild", action="store_true", help="generate it again even if it exists")
    parser.add_argument(
        "--output", "-o", help="a folder of your own instead of the cache (which `data: shapes-prefs` reads)"
    )
    parser.add_argument(
        "--pairs", type=int, help="pairs to generate (with --output; the cached set has the default 2400)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole recipe (with --output)")
    parser.add_argument(
        "--model",
        default="shapes",
        help="the ShapesWorld model whose images are paired (with --output): shapes, or shapes-flow for "
        "on-policy pairs to train the flow model on",
    )
    parser.set_defaults(handler=prefs)


def prefs(args: argparse.Namespace) -> int:
    from diffalign.shapes import prefs

    if args.output is None:
        if args.pairs is not None or args.seed != 0 or args.model != "shapes":
            raise SystemExit(
                "diffalign shapes prefs: --pairs, --seed and --model change the recipe, so they need --output DIR; "
                "the cached set (what `data: shapes-prefs` reads) always has the default recipe"
            )
        folder = prefs.cached_path(rebuild=args.rebuild)
    else:
        folder = Path(args.output)
        if args.rebuild or not (folder / "recipe.json").is_file():
            pairs = prefs.DEFAULT_PAIRS if args.pairs is None else args.pairs
            print(f"generating {pairs} preference pairs of {args.model}'s images into {folder}", flush=True)
            prefs.build(folder, pairs=pairs, seed=args.seed, model=args.model, replace=args.rebuild)
    report = prefs.read_recipe(folder)
    print(f"{report['name']} at {folder}")
    print(prefs.describe(report["figures"]))
    return 0


def train(args: argparse.Namespace) -> int:
    from diffalign.shapes.training import ShapesTrainingConfig, train_all

    config = ShapesTrainingConfig(**dataclass_values(args, ShapesTrainingConfig))
    report = train_all(config, Path(args.output), fp16=not args.fp32)
    seconds = ", ".join(f"{stage} {value / 60:.1f} min" for stage, value in report["seconds"].items())
    print(f"trained ShapesWorld models into {args.output} ({seconds})")
    return 0


def train_inpaint(args: argparse.Namespace) -> int:
    from diffalign.shapes import assets, inpaint_training

    config = inpaint_training.InpaintTrainingConfig(
        **dataclass_values(args, inpaint_training.InpaintTrainingConfig)
    )
    output = Path(args.output)
    report = inpaint_training.train_inpainting(config, output, fp16=not args.fp32)
    seconds = report["seconds"]
    print(
        f"trained the ShapesWorld inpainting UNet into {output} "
        f"(training {seconds['train'] / 60:.1f} min, this run {seconds['run'] / 60:.1f} min)"
    )
    for name, quality in report.get("evaluation", {}).items():
        print(
            f"  {name}: oracle success {quality['success']:.3f}, mean score {quality['score']:.3f}, "
            f"kept-region change {quality['kept_error']:.4f} over {quality['scenes']} edits"
        )
    if args.install:
        inpaint_training.install(output / "unet")
        print(f"installed {output / 'unet'} as the shipped model ({assets.INPAINT_UNET_DIR})")
    return 0


def train_negclip(args: argparse.Namespace) -> int:
    from diffalign import outputs
    from diffalign.shapes import assets, negclip

    output = Path(args.output)
    outputs.check_new_run_folder(output)
    config = negclip.NegClipConfig(**dataclass_values(args, negclip.NegClipConfig))
    report = negclip.train_negclip(config, output, fp16=not args.fp32)
    print(
        f"fine-tuned the ShapesWorld CLIP with hard negatives into {output / 'clip'} "
        f"({report['train_seconds'] / 60:.1f} min)"
    )
    for name in report["after"]:
        print(f"  {name}: {report['before'][name]:.3f} -> {report['after'][name]:.3f}")
    if args.install:
        negclip.install(output / "clip")
        print(f"installed {output / 'clip'} as the reward model `shapes-negclip` ({assets.NEGCLIP_DIR})")
    return 0
