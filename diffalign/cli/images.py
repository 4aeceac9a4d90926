"""``diffalign sample`` and ``diffalign score``: images from a pipeline, and rewards of images."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from diffalign.cli.args import CommandError, lora_folder, non_negative_float, parse_options, positive_int


def configure_sample(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Generate images with the DDIM sampler training uses. "
        "Python: diffalign.sampling.sample(diffalign.pipeline.load(model), prompts, ...)."
    )
    parser.add_argument(
        "--model", default="tiny-random", help="built-in name, diffusers folder or cached hub id"
    )
    parser.add_argument("--lora", help="folder with a LoRA saved by `diffalign train` (its lora/ folder)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--prompt", help="one prompt, repeated --num times")
    group.add_argument("--prompts", default="simple-animals", help="prompt set name or text file")
    parser.add_argument("--num", "-n", type=positive_int, default=8, help="number of images")
    parser.add_argument("--steps", type=positive_int, default=20, help="DDIM steps")
    parser.add_argument("--guidance-scale", type=non_negative_float, default=5.0)
    parser.add_argument("--eta", type=non_negative_float, default=0.0, help="DDIM eta (0: deterministic)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", "-o", default="samples", help="output folder")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace images of an earlier run in --output"
    )
    parser.set_defaults(handler=cmd_sample)


def configure_score(parser: argparse.ArgumentParser) -> None:
    parser.description = "Score images with a registered reward. Python: diffalign.rewards.build(name, **options)(images, prompts)."
    parser.add_argument("--reward", required=True, help="reward name (see `diffalign rewards`)")
    parser.add_argument(
        "--option", action="append", metavar="KEY=VALUE", help="reward option, e.g. checkpoint=/path"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images to score")
    source.add_argument("--prompts", help="prompt set or file: generate one image per prompt and score it")
    parser.add_argument("--prompt", help="the prompt all images in --images are scored against")
    parser.add_argument("--captions", help="text file with one prompt per image of --images (sorted by name)")
    parser.add_argument("--model", default="tiny-random", help="pipeline for --prompts")
    parser.add_argument("--lora", help="LoRA folder for --prompts")
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", "-o", help="write a CSV of scores here")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --output if it exists (never an input)"
    )
    parser.set_defaults(handler=cmd_score)


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from diffalign import images, outputs, pipeline, plots
    from diffalign import prompts as prompt_sets
    from diffalign.sampling import sample

    prompts = [args.prompt] if args.prompt else prompt_sets.load_prompts(args.prompts)
    prompts = (prompts * args.num)[: args.num] if args.prompt else prompts[: args.num]
    lora = lora_folder(args.lora)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise outputs.OutputError(f"--output {args.output!r} is a file; give a folder for the images")
    written = [out / f"{index:04d}.png" for index in range(len(prompts))] + [
        out / "prompts.txt",
        out / "grid.png",
    ]
    outputs.check_output_files(
        written, inputs=[None if args.prompt else args.prompts], overwrite=args.overwrite
    )
    pipe = pipeline.load(args.model)
    if lora:
        pipe.load_lora_weights(lora)
    generator = torch.Generator().manual_seed(args.seed)
    all_images = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        trajectory = sample(
            pipe,
            batch,
            num_steps=args.steps,
            guidance_scale=args.guidance_scale,
            eta=args.eta,
            generator=generator,
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
    from diffalign import prompts as prompt_sets

    if args.output:
        inputs = [args.captions, args.prompts, *(images.list_images(args.images) if args.images else [])]
        outputs.check_output_file(args.output, inputs=inputs, overwrite=args.overwrite, what="--output")
    lora = lora_folder(args.lora)
    reward = rewards.build(args.reward, **parse_options(args.option))
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
        with (
            outputs.replacing(Path(args.output)) as temporary,
            open(temporary, "w", newline="", encoding="utf-8") as stream,
        ):
            writer = csv.writer(stream)
            writer.writerow(["image", "prompt", args.reward])
            writer.writerows(zip(names, captions, scores))
    return 0
