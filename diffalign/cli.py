"""The `diffalign` command: a thin shell over the Python API.

Each subcommand parses its arguments and makes one call into the library; anything it does
can be done from Python with the function named in its help.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from diffalign import config as config_module
from diffalign import prompts as prompt_sets
from diffalign.errors import DiffalignError, describe_os_error


class CommandError(DiffalignError):
    """Arguments that do not fit together (found by a command rather than by argparse)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number ≥ 0, got {text}")
    return value


def _lora_folder(path: str | None) -> str | None:
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
        raise CommandError(f"--lora {path!r} holds no LoRA weights (*.safetensors); give a run's lora/ folder")
    return str(folder)


def _reward_table() -> str:
    from diffalign import rewards

    rows = [f"  {item.name:<24} {'differentiable' if item.differentiable else '              '}  {item.description}"
            for item in rewards.available()]
    return "\n".join(rows)


def _train_epilog() -> str:
    from diffalign import optim

    methods = "\n".join(f"  {info.name:<10} {info.description}" for info in optim.available())
    keys = "\n".join(f"  {key:<36} {default:<22} {text}" for key, default, text in config_module.describe())
    return (
        "default job (no method named): diffalign/presets/default.yaml, AlignProp + DiffExp on shapes-clip,\n"
        "  20 epochs (docs/studies/default-job.md)\n\n"
        "methods (method=...; each starts from its preset in diffalign/presets/<method>.yaml):\n"
        f"{methods}\n\n"
        "exploration (exploration=...):\n"
        "  none       sample with the fixed guidance scale and the prompt as written\n"
        "  diffexp    DiffExp (Chae et al. 2025): low guidance on early steps + random phrase weights (compel)\n\n"
        f"rewards:\n{_reward_table()}\n\n"
        f"prompt sets:\n  {', '.join(prompt_sets.builtin_names())} (or a .txt file, one prompt per line)\n\n"
        f"config keys (YAML file and --set key=value):\n{keys}\n\n"
        "Python: diffalign.train.train(diffalign.config.load_config(path, overrides))"
    )


def _parse_options(pairs: list[str]) -> dict:
    options: dict = {}
    for text in pairs:
        options = config_module._merge(options, config_module.parse_override(text))
    return options


def _run_config(args: argparse.Namespace) -> config_module.TrainConfig:
    """The config of ``diffalign train``: with ``--resume`` and no file, the run's own config.yaml."""
    overrides = list(args.set or [])
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    path = args.config
    if args.resume and path is None:
        given: dict = {}
        for text in overrides:
            given = config_module._merge(given, config_module.parse_override(text))
        output_dir = str(given.get("output_dir", config_module.TrainConfig.output_dir))
        path = Path(output_dir) / "config.yaml"
        if not path.is_file():
            raise CommandError(f"--resume: there is no run to resume in {output_dir!r} (no config.yaml there)")
    return config_module.load_config(path, overrides)


def _kept(output_dir: str, error: BaseException) -> str:
    """What a failed training run left intact, said after its error."""
    from diffalign import checkpoint
    from diffalign.optim import TrainingDiverged

    folder = Path(output_dir) / "checkpoints"
    try:
        latest = checkpoint.latest(folder) if folder.is_dir() else None
    except checkpoint.CheckpointError:
        latest = None
    if latest is not None:
        return (f"\nkept: the last complete checkpoint, {latest.name}, in {folder}; continue with "
                f"`diffalign train --output-dir {output_dir} --resume`")
    if isinstance(error, (OSError, TrainingDiverged)):
        return f"\nkept: no checkpoint had been written yet in {output_dir}"
    return ""


def cmd_train(args: argparse.Namespace) -> int:
    from diffalign.train import train

    config = _run_config(args)
    try:
        result = train(config, resume=args.resume, progress=not args.no_progress)
    except (DiffalignError, OSError) as error:
        text = describe_os_error(error) if isinstance(error, OSError) else str(error)
        raise CommandError(text + _kept(config.output_dir, error)) from error
    if not result.main_process:
        return 0
    last = result.history[-1]
    print(f"done: epoch {last.get('epoch', 0)}, last reward_mean {last.get('reward_mean', float('nan')):.4g}")
    print(result.summary(config.reward))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from diffalign import images, outputs, pipeline, plots
    from diffalign.sampling import sample

    prompts = [args.prompt] if args.prompt else prompt_sets.load_prompts(args.prompts)
    prompts = (prompts * args.num)[: args.num] if args.prompt else prompts[: args.num]
    lora = _lora_folder(args.lora)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise outputs.OutputError(f"--output {args.output!r} is a file; give a folder for the images")
    written = [out / f"{index:04d}.png" for index in range(len(prompts))] + [out / "prompts.txt", out / "grid.png"]
    outputs.check_output_files(written, inputs=[None if args.prompt else args.prompts], overwrite=args.overwrite)
    pipe = pipeline.load(args.model)
    if lora:
        pipe.load_lora_weights(lora)
    generator = torch.Generator().manual_seed(args.seed)
    all_images = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        trajectory = sample(
            pipe, batch, num_steps=args.steps, guidance_scale=args.guidance_scale, eta=args.eta, generator=generator
        )
        for offset, image in enumerate(trajectory.images):
            images.save_image(image, out / f"{start + offset:04d}.png")
        all_images.append(trajectory.images)
    outputs.write_text(out / "prompts.txt", "\n".join(prompts) + "\n")
    plots.save_grid(torch.cat(all_images), prompts, out / "grid.png", title=f"{args.model}")
    print(f"wrote {len(prompts)} images, prompts.txt and grid.png to {out}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import torch

    from diffalign import images, outputs, rewards

    if args.output:
        inputs = [args.captions, args.prompts, *(images.list_images(args.images) if args.images else [])]
        outputs.check_output_file(args.output, inputs=inputs, overwrite=args.overwrite, what="--output")
    lora = _lora_folder(args.lora)
    reward = rewards.build(args.reward, **_parse_options(args.option or []))
    if args.images:
        paths = images.list_images(args.images)
        if not paths:
            raise images.ImageError(f"no images ({', '.join(images.IMAGE_SUFFIXES)}) in {args.images}")
        if args.captions:
            captions = prompt_sets.load_prompts(args.captions)
            if len(captions) != len(paths):
                raise CommandError(
                    f"{len(paths)} images in {args.images} but {len(captions)} captions in {args.captions}: "
                    "give one caption line per image (images sorted by name)"
                )
        else:
            captions = [args.prompt or ""] * len(paths)
        names, scores = [], []
        for path, caption in zip(paths, captions):
            image = images.load_image(path)[None]
            scores.append(rewards.checked_call(reward, image, [caption]).item())
            names.append(path.name)
    else:
        from diffalign import pipeline
        from diffalign.sampling import sample

        captions = prompt_sets.load_prompts(args.prompts)
        pipe = pipeline.load(args.model)
        if lora:
            pipe.load_lora_weights(lora)
        generator = torch.Generator().manual_seed(args.seed)
        names, scores = [], []
        for start in range(0, len(captions), 8):
            batch = captions[start : start + 8]
            trajectory = sample(pipe, batch, num_steps=args.steps, generator=generator)
            scores.extend(rewards.checked_call(reward, trajectory.images, batch).tolist())
            names.extend(f"sample-{start + i:04d}" for i in range(len(batch)))
    for name, caption, score in zip(names, captions, scores):
        print(f"{score:12.5g}  {name}  {caption}")
    mean = sum(scores) / len(scores)
    print(f"{args.reward}: mean {mean:.5g} over {len(scores)} images")
    if args.output:
        with outputs.replacing(Path(args.output)) as temporary, open(temporary, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(["image", "prompt", args.reward])
            writer.writerows(zip(names, captions, scores))
    return 0


def cmd_rewards(args: argparse.Namespace) -> int:
    from diffalign import rewards

    if args.json:
        print(json.dumps([{"name": r.name, "differentiable": r.differentiable, "description": r.description,
                           "needs_checkpoint": r.needs_checkpoint} for r in rewards.available()], indent=2))
    else:
        print(_reward_table())
    return 0


def cmd_shapes_train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from diffalign.shapes.training import ShapesTrainingConfig, train_all

    values = {f.name: getattr(args, f.name) for f in fields(ShapesTrainingConfig) if getattr(args, f.name) is not None}
    report = train_all(ShapesTrainingConfig(**values), Path(args.output), fp16=not args.fp32)
    seconds = ", ".join(f"{stage} {value / 60:.1f} min" for stage, value in report["seconds"].items())
    print(f"trained ShapesWorld models into {args.output} ({seconds})")
    return 0


def cmd_shapes_train_inpaint(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from diffalign.shapes import assets, inpaint_training

    config_fields = fields(inpaint_training.InpaintTrainingConfig)
    values = {f.name: getattr(args, f.name) for f in config_fields if getattr(args, f.name) is not None}
    output = Path(args.output)
    report = inpaint_training.train_inpainting(
        inpaint_training.InpaintTrainingConfig(**values), output, fp16=not args.fp32
    )
    seconds = report["seconds"]
    print(f"trained the ShapesWorld inpainting UNet into {output} "
          f"(training {seconds['train'] / 60:.1f} min, this run {seconds['run'] / 60:.1f} min)")
    for name, quality in report.get("evaluation", {}).items():
        print(f"  {name}: oracle success {quality['success']:.3f}, mean score {quality['score']:.3f}, "
              f"kept-region change {quality['kept_error']:.4f} over {quality['scenes']} edits")
    if args.install:
        inpaint_training.install(output / "unet")
        print(f"installed {output / 'unet'} as the shipped model ({assets.INPAINT_UNET_DIR})")
    return 0


def cmd_shapes_train_negclip(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from diffalign import outputs
    from diffalign.shapes import assets, negclip

    values = {f.name: getattr(args, f.name) for f in fields(negclip.NegClipConfig) if getattr(args, f.name) is not None}
    output = Path(args.output)
    outputs.check_new_run_folder(output)
    report = negclip.train_negclip(negclip.NegClipConfig(**values), output, fp16=not args.fp32)
    print(f"fine-tuned the ShapesWorld CLIP with hard negatives into {output / 'clip'} "
          f"({report['train_seconds'] / 60:.1f} min)")
    for name in report["after"]:
        print(f"  {name}: {report['before'][name]:.3f} -> {report['after'][name]:.3f}")
    if args.install:
        negclip.install(output / "clip")
        print(f"installed {output / 'clip'} as the reward model `shapes-negclip` ({assets.NEGCLIP_DIR})")
    return 0


def _add_shapes_commands(commands) -> None:
    from dataclasses import fields

    from diffalign.shapes.inpaint_training import InpaintTrainingConfig
    from diffalign.shapes.negclip import NegClipConfig
    from diffalign.shapes.training import ShapesTrainingConfig

    shapes = commands.add_parser("shapes", help="ShapesWorld: the embedded default world and its models")
    actions = shapes.add_subparsers(dest="shapes_command", required=True)
    train = actions.add_parser(
        "train",
        help="train ShapesWorld's CLIP, VAE and UNet from scratch (reproduces the shipped weights)",
        description="Renders train-split scenes, trains CLIP contrastively, the VAE, then the UNet on VAE "
        "latents conditioned on the CLIP text tower, and saves <output>/pipeline and <output>/clip.",
    )
    train.add_argument("--output", "-o", required=True, help="folder for pipeline/, clip/ and training_report.json")
    train.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16, as shipped)")
    for spec in fields(ShapesTrainingConfig):
        flag = "--" + spec.name.replace("_", "-")
        train.add_argument(flag, type=type(spec.default), help=f"default {spec.default}")
    train.set_defaults(handler=cmd_shapes_train)

    inpaint = actions.add_parser(
        "train-inpaint",
        help="fine-tune the shipped ShapesWorld UNet into a 9-channel inpainting UNet (shapes-inpaint)",
        description="Renders train-split scenes and fine-tunes the shipped UNet on random masks "
        "(SD-inpainting's recipe, scaled down); saves <output>/unet (what ships), <output>/pipeline "
        "(a standalone diffusers inpainting folder) and training_report.json with the editor's oracle "
        "scores. Rerun the same command to resume an interrupted run. "
        "Python: diffalign.shapes.inpaint_training.train_inpainting(config, output).",
    )
    inpaint.add_argument("--output", "-o", required=True,
                         help="folder for unet/, pipeline/ and training_report.json")
    inpaint.add_argument("--install", action="store_true",
                         help="then copy <output>/unet into the package, as the model `shapes-inpaint` loads")
    inpaint.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16, as shipped)")
    for spec in fields(InpaintTrainingConfig):
        flag = "--" + spec.name.replace("_", "-")
        inpaint.add_argument(flag, type=type(spec.default), help=f"default {spec.default}")
    inpaint.set_defaults(handler=cmd_shapes_train_inpaint)

    negative = actions.add_parser(
        "train-negclip",
        help="fine-tune the shipped ShapesWorld CLIP with hard negatives (the reward shapes-negclip)",
        description="Renders fresh train-split scenes and fine-tunes the shipped CLIP with NegCLIP's loss "
        "plus a caption-against-its-negative term: every caption's hard negative (converse relation, "
        "swapped colours or shapes, the other count) joins the batch's texts. Saves <output>/clip and "
        "training_report.json with the word-order accuracies before and after (the shipped model: "
        "about 20 min on one CPU thread). Python: diffalign.shapes.negclip.train_negclip(config, output).",
    )
    negative.add_argument("--output", "-o", required=True, help="a new folder for clip/ and training_report.json")
    negative.add_argument("--install", action="store_true",
                          help="then copy <output>/clip into the package, as the model `shapes-negclip` loads")
    negative.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16, as shipped)")
    for spec in fields(NegClipConfig):
        negative.add_argument("--" + spec.name.replace("_", "-"), type=type(spec.default), help=f"default {spec.default}")
    negative.set_defaults(handler=cmd_shapes_train_negclip)


def cmd_bench_tia2(args: argparse.Namespace) -> int:
    from diffalign.benchmarks import tia2

    output = Path(args.output) if args.output else tia2.RESULTS
    result = tia2.run(
        args.rewards,
        args.data,
        options=_parse_options(args.option or []),
        subsets=args.subsets,
        batch_size=args.batch_size,
        cache=not args.no_cache,
        cache_dir=args.cache_dir,
        output=output,
        progress=not args.no_progress,
    )
    print(tia2.format_table(result))
    print(f"wrote tia2.json, tia2.csv and tia2.png to {output}")
    return 0


def cmd_bench_shapes_tia(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from diffalign.benchmarks import shapes_tia

    names = [f.name for f in fields(shapes_tia.ShapesTiaConfig)]
    values = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if "guidance_scales" in values:
        values["guidance_scales"] = tuple(values["guidance_scales"])
    config = shapes_tia.ShapesTiaConfig(**values)
    folder = shapes_tia.make(args.output, config, progress=not args.no_progress)
    print(f"wrote shapes-TIA to {folder} (<subset>.json and <subset>/ per subset, README.md)")
    return 0


def cmd_bench_protection(args: argparse.Namespace) -> int:
    from diffalign.benchmarks import protection

    result = protection.run(protection.settings_from(args), Path(args.output), progress=not args.no_progress)
    print(protection.format_table(result))
    print(f"wrote {args.output} and its figures beside it")
    return 0


def _add_bench_commands(commands) -> None:
    from dataclasses import fields

    # tia2 itself is imported only to run: scipy and scikit-learn would slow every command.
    from diffalign.benchmarks import shapes_tia

    bench = commands.add_parser("bench", help="benchmarks of rewards and models")
    actions = bench.add_subparsers(dest="bench_command", required=True)
    run = actions.add_parser(
        "tia2",
        help="TIA2 (Kim et al. 2024): how well rewards agree with human text-image alignment labels",
        description="Scores every labelled image with each reward and reports, per subset, the mean over "
        "prompts of AUROC, AUPRC, precision at 5/10/25, Spearman and Kendall against the labels; writes "
        "tia2.json, tia2.csv and the bar chart tia2.png. Python: diffalign.benchmarks.tia2.run(...), or "
        "tia2.evaluate(reward, data) for one reward.",
    )
    run.add_argument("--rewards", nargs="+", default=["shapes-clip", "shapes-oracle"], metavar="NAME",
                     help="registered reward names (see `diffalign rewards`; default: shapes-clip shapes-oracle)")
    run.add_argument("--data", default=shapes_tia.NAME,
                     help="folder of TIA2 <subset>.json files (images in <subset>/, images/ or beside them), "
                     f"one such file, or {shapes_tia.NAME} (built-in, generated on first use; the default)")
    run.add_argument("--subsets", nargs="+", metavar="SUBSET", help="subsets to evaluate (default: all)")
    run.add_argument("--option", action="append", metavar="REWARD.KEY=VALUE",
                     help="reward option, e.g. shapes-clip.checkpoint=/path; repeatable")
    run.add_argument("--batch-size", type=_positive_int, default=64, help="images per reward call")
    run.add_argument("--output", "-o",
                     help="folder for tia2.json/.csv/.png (default: the package's benchmarks/results/tia2/)")
    run.add_argument("--cache-dir", help="score cache folder (default: <data>/.diffalign-scores/)")
    run.add_argument("--no-cache", action="store_true", help="neither read nor write cached scores")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(handler=cmd_bench_tia2)

    make = actions.add_parser(
        "shapes-tia",
        help="write shapes-TIA (the built-in TIA2-format set) to a folder, to inspect or share it",
        description="Generates ShapesWorld images with the shipped model and labels them with the exact "
        "detector (plus simulated annotator noise), in TIA2's format. "
        "Python: diffalign.benchmarks.shapes_tia.make(...).",
    )
    make.add_argument("--output", "-o", required=True, help="new (or empty) folder")
    make.add_argument("--no-progress", action="store_true", help="no progress bar")
    for spec in fields(shapes_tia.ShapesTiaConfig):
        flag = "--" + spec.name.replace("_", "-")
        help_text = f"{spec.metadata['help']} (default {spec.default})"
        if isinstance(spec.default, tuple):
            make.add_argument(flag, type=float, nargs="+", help=help_text)
        else:
            make.add_argument(flag, type=type(spec.default), help=help_text)
    make.set_defaults(handler=cmd_bench_shapes_tia)

    from diffalign.benchmarks import protection

    guard = actions.add_parser(
        "protection",
        help="DiffusionGuard, PhotoGuard and AdvDM against ShapesWorld inpainting edits, scored by the oracle",
        description=protection.__doc__.split("\n\n")[0] + " Protects scenes with each method and budget, "
        "edits them with seen and unseen masks, after JPEG and with a second editor, and reports edit success, "
        "PSNR, CLIP directional similarity and cost. Python: diffalign.benchmarks.protection.run(Settings(...)).",
    )
    protection.add_arguments(guard)
    guard.set_defaults(handler=cmd_bench_protection)


def _pixel_units(text: str) -> float:
    """A value in [0, 1] pixel units, written as a number or as a fraction of 255 ("8/255")."""
    numerator, slash, denominator = text.partition("/")
    try:
        return float(numerator) / float(denominator) if slash else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"expected a number like 0.0314 or a fraction like 8/255, got {text!r}"
        ) from None


def cmd_protect(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from diffalign import defenses, images, outputs, protection_io
    from diffalign.inpainting import load_inpainting

    if Path(args.output).suffix.lower() != ".png":
        raise CommandError(
            f"the protected image must be a lossless PNG, got -o {args.output!r}: "
            "JPEG or WebP compression would erase much of the perturbation. Use a .png name."
        )
    if args.step_size > args.budget:
        raise CommandError(f"--step-size ({args.step_size:.4g}) must not exceed --budget ({args.budget:.4g})")
    outputs.check_output_file(args.output, inputs=[args.image, args.mask], overwrite=args.overwrite)
    # Files first: bad input fails before the (slow) model load.
    image, mask = protection_io.read_image_and_mask(args.image, args.mask, purpose="protect")
    pipe = load_inpainting(args.model)
    inputs = protection_io.fit_to_model(pipe, image, mask, purpose="protect")
    for notice in inputs.notices:
        print(f"diffalign protect: note: {notice}", file=sys.stderr)
    options = {"budget": args.budget, "step_size": args.step_size, "steps": args.steps}
    if args.no_augment:
        options["augment"] = None
    with tqdm(total=args.steps, desc=args.method, unit="step", disable=args.no_progress) as bar:

        def progress(step: int, total: int, value: float) -> None:
            bar.update(step - bar.n)
            bar.set_postfix(objective=f"{value:.4g}", refresh=False)

        result = defenses.protect(
            pipe,
            inputs.image,
            inputs.mask,
            method=args.method,
            generator=torch.Generator().manual_seed(args.seed),
            progress=progress,
            **options,
        )
    path = images.save_image(result.image, args.output)
    psnr = protection_io.psnr(inputs.image, images.load_image(path))
    height, width = result.image.shape[-2:]
    budget = f"budget {args.budget:.4f} = {args.budget * 255:.3g}/255"
    print(f"wrote {path} ({width}×{height} px, {args.method}, {budget})")
    print(
        f"cost: {result.unet_calls} UNet calls, {result.vae_calls} VAE calls, {result.seconds:.1f} s; "
        f"PSNR vs the original: {psnr:.2f} dB"
    )
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    import torch

    from diffalign import images, outputs, protection_io
    from diffalign.inpainting import edit, load_inpainting

    outputs.check_output_file(args.output, inputs=[args.image, args.mask], overwrite=args.overwrite)
    image, mask = protection_io.read_image_and_mask(args.image, args.mask, purpose="keep")
    pipe = load_inpainting(args.model)
    inputs = protection_io.fit_to_model(pipe, image, mask, purpose="keep")
    for notice in inputs.notices:
        print(f"diffalign edit: note: {notice}", file=sys.stderr)
    output = edit(
        pipe,
        inputs.image,
        inputs.mask,
        args.prompt,
        steps=args.steps,
        guidance=args.guidance,
        generator=torch.Generator().manual_seed(args.seed),
    )
    path = images.save_image(output, args.output)
    print(f"wrote {path}: kept the masked region, repainted the rest from {args.prompt!r}")
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        print(
            "diffalign app: error: the app needs gradio, an optional dependency. "
            "Install it with: pip install 'diffalign[app]'",
            file=sys.stderr,
        )
        return 2
    from diffalign.app import create_app, launch
    from diffalign.inpainting import load_inpainting

    launch(create_app(load_inpainting(args.model)), host=args.host, port=args.port, share=args.share)
    return 0


def _add_protection_commands(commands) -> None:
    from diffalign.defenses import METHODS
    from diffalign.defenses.diffusionguard import BUDGET, STEP_SIZE, STEPS

    model_help = (
        "inpainting pipeline: a built-in name (shapes-inpaint, the default; tiny-random-inpaint, random "
        "weights for tests), a diffusers folder or a hub id already in the Hugging Face cache"
    )
    sizes = (
        "Images are processed at the model's working size: models trained at one small resolution "
        "(ShapesWorld, tiny-random-inpaint) at their native size (UNet sample_size × VAE scale factor), "
        "others with the longest side capped at 1024 px; sides are rounded to multiples of the VAE factor. "
        "A mask of another size than the image is resized onto it. Each change is reported."
    )
    masks = "mask image of the same scene: white (≥ 50%% grey) = the region to protect, black = the rest"
    protect = commands.add_parser(
        "protect",
        help="protect a region of an image against inpainting edits (DiffusionGuard and baselines)",
        description="Adds an imperceptible perturbation to the masked region of IMAGE so that an inpainting "
        "editor that keeps that region and repaints the rest from a prompt fails. Writes a PNG and prints "
        f"the cost and the PSNR against the original. {sizes} "
        "Python: diffalign.defenses.protect(pipe, image, mask, method=...).",
    )
    protect.add_argument("image", metavar="IMAGE", help="image to protect (PNG, JPEG, WebP, BMP)")
    protect.add_argument("--mask", required=True, help=masks)
    protect.add_argument("--output", "-o", required=True, help="protected image, a .png file (lossless)")
    protect.add_argument("--model", default="shapes-inpaint", help=model_help)
    protect.add_argument("--method", choices=list(METHODS), default="diffusionguard",
                         help="diffusionguard (Choi et al. 2025, the default), photoguard (encoder attack, "
                         "Salman et al. 2023) or advdm (Liang et al. 2023)")
    protect.add_argument("--budget", type=_pixel_units, default=BUDGET,
                         help="largest change of a pixel, in [0, 1] pixel units, not 0-255: 8/255 ≈ 0.0314 "
                         "(the default) lets each protected pixel move by 8 grey levels; '8/255' is accepted")
    protect.add_argument("--steps", type=_positive_int, default=STEPS, help=f"PGD iterations (default {STEPS})")
    protect.add_argument("--step-size", type=_pixel_units, default=STEP_SIZE,
                         help="PGD step, in [0, 1] pixel units like --budget and at most it "
                         "(default 0.5/255 ≈ 0.00196)")
    protect.add_argument("--no-augment", action="store_true",
                         help="train against the given mask only (default for diffusionguard: random "
                         "shrunken masks, so the protection holds for the attacker's own mask)")
    protect.add_argument("--seed", type=int, default=0, help="seed for noises and mask augmentation")
    protect.add_argument("--overwrite", action="store_true", help="replace --output if it exists (never an input)")
    protect.add_argument("--no-progress", action="store_true", help="no progress bar")
    protect.set_defaults(handler=cmd_protect)

    edit = commands.add_parser(
        "edit",
        help="inpainting edit: keep the masked region of an image and repaint the rest from a prompt",
        description="What an attacker does with a photo, and how to check a protection: the masked region "
        f"is kept, the rest is regenerated from --prompt. {sizes} "
        "Python: diffalign.inpainting.edit(pipe, image, keep_mask, prompt).",
    )
    edit.add_argument("image", metavar="IMAGE", help="image to edit (PNG, JPEG, WebP, BMP)")
    edit.add_argument("--mask", required=True, help=masks.replace("protect", "keep"))
    edit.add_argument("--prompt", required=True, help="what to paint around the kept region")
    edit.add_argument("--output", "-o", required=True, help="edited image (.png recommended)")
    edit.add_argument("--model", default="shapes-inpaint", help=model_help)
    edit.add_argument("--steps", type=_positive_int, default=50, help="denoising steps (default 50)")
    edit.add_argument("--guidance", type=_non_negative_float, default=7.5,
                      help="classifier-free guidance scale (default 7.5)")
    edit.add_argument("--seed", type=int, default=0, help="seed for the initial noise")
    edit.add_argument("--overwrite", action="store_true", help="replace --output if it exists (never an input)")
    edit.set_defaults(handler=cmd_edit)

    app = commands.add_parser(
        "app",
        help="web app: protect an image, download it, and compare edits of the original and the protected "
        "one",
        description="Starts the Gradio app on this machine only (127.0.0.1) unless --host says otherwise; "
        "no public link unless --share. Needs the app extra: pip install 'diffalign[app]'. "
        "Python: diffalign.app.launch(diffalign.app.create_app(pipe)).",
    )
    app.add_argument("--model", default="shapes-inpaint", help=model_help)
    app.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes the app to the network)")
    app.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    app.add_argument("--share", action="store_true",
                     help="also create a temporary public gradio.live link (off by default)")
    app.set_defaults(handler=cmd_app)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffalign", description="Align text-to-image diffusion models with rewards and human feedback."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="fine-tune a pipeline with a reward (DDPO)",
        description="Fine-tune a Stable Diffusion pipeline's UNet (LoRA) to maximise a reward. With no "
        "arguments: a short DDPO run of the built-in default.",
        epilog=_train_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", nargs="?", help="YAML config file (keys below)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key; repeatable")
    train.add_argument("--output-dir", help="shorthand for --set output_dir=...")
    train.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=cmd_train)

    sample = commands.add_parser("sample", help="generate images from a pipeline (+ LoRA)")
    sample.add_argument("--model", default="tiny-random", help="built-in name, diffusers folder or cached hub id")
    sample.add_argument("--lora", help="folder with a LoRA saved by `diffalign train` (its lora/ folder)")
    group = sample.add_mutually_exclusive_group()
    group.add_argument("--prompt", help="one prompt, repeated --num times")
    group.add_argument("--prompts", default="simple-animals", help="prompt set name or text file")
    sample.add_argument("--num", "-n", type=_positive_int, default=8, help="number of images")
    sample.add_argument("--steps", type=_positive_int, default=20, help="DDIM steps")
    sample.add_argument("--guidance-scale", type=_non_negative_float, default=5.0)
    sample.add_argument("--eta", type=_non_negative_float, default=0.0, help="DDIM eta (0: deterministic)")
    sample.add_argument("--batch-size", type=_positive_int, default=8)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--output", "-o", default="samples", help="output folder")
    sample.add_argument("--overwrite", action="store_true", help="replace images of an earlier run in --output")
    sample.set_defaults(handler=cmd_sample)

    score = commands.add_parser("score", help="score a folder of images, or generations from a prompt file")
    score.add_argument("--reward", required=True, help="reward name (see `diffalign rewards`)")
    score.add_argument("--option", action="append", metavar="KEY=VALUE", help="reward option, e.g. checkpoint=/path")
    source = score.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images to score")
    source.add_argument("--prompts", help="prompt set or file: generate one image per prompt and score it")
    score.add_argument("--prompt", help="the prompt all images in --images are scored against")
    score.add_argument("--captions", help="text file with one prompt per image of --images (sorted by name)")
    score.add_argument("--model", default="tiny-random", help="pipeline for --prompts")
    score.add_argument("--lora", help="LoRA folder for --prompts")
    score.add_argument("--steps", type=_positive_int, default=20)
    score.add_argument("--seed", type=int, default=0)
    score.add_argument("--output", "-o", help="write a CSV of scores here")
    score.add_argument("--overwrite", action="store_true", help="replace --output if it exists (never an input)")
    score.set_defaults(handler=cmd_score)

    _add_shapes_commands(commands)
    _add_bench_commands(commands)
    _add_protection_commands(commands)

    listing = commands.add_parser("rewards", help="list the registered rewards")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_rewards)
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


if __name__ == "__main__":
    sys.exit(main())
