"""``diffalign protect``, ``edit`` and ``app``: protecting images against inpainting edits
(``diffalign.defenses``), running such an edit (``diffalign.inpainting``), and the web app."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffalign.cli.args import CommandError, non_negative_float, pixel_units, positive_int

MODEL_HELP = (
    "inpainting pipeline: a built-in name (shapes-inpaint, the default; tiny-random-inpaint, random "
    "weights for tests), a diffusers folder or a hub id already in the Hugging Face cache"
)
SIZES = (
    "Images are processed at the model's working size: models trained at one small resolution "
    "(ShapesWorld, tiny-random-inpaint) at their native size (UNet sample_size × VAE scale factor), "
    "others with the longest side capped at 1024 px; sides are rounded to multiples of the VAE factor. "
    "A mask of another size than the image is resized onto it. Each change is reported."
)
MASKS = "mask image of the same scene: white (≥ 50%% grey) = the region to protect, black = the rest"


def configure_protect(parser: argparse.ArgumentParser) -> None:
    from diffalign.defenses import METHODS
    from diffalign.defenses.diffusionguard import BUDGET, STEP_SIZE, STEPS

    parser.description = (
        "Adds an imperceptible perturbation to the masked region of IMAGE so that an inpainting "
        "editor that keeps that region and repaints the rest from a prompt fails. Writes a PNG and prints "
        f"the cost and the PSNR against the original. {SIZES} "
        "Python: diffalign.defenses.protect(pipe, image, mask, method=...)."
    )
    parser.add_argument("image", metavar="IMAGE", help="image to protect (PNG, JPEG, WebP, BMP)")
    parser.add_argument("--mask", required=True, help=MASKS)
    parser.add_argument("--output", "-o", required=True, help="protected image, a .png file (lossless)")
    parser.add_argument("--model", default="shapes-inpaint", help=MODEL_HELP)
    parser.add_argument(
        "--method",
        choices=list(METHODS),
        default="diffusionguard",
        help="diffusionguard (Choi et al. 2025, the default), photoguard (encoder attack, "
        "Salman et al. 2023) or advdm (Liang et al. 2023)",
    )
    parser.add_argument(
        "--budget",
        type=pixel_units,
        default=BUDGET,
        help="largest change of a pixel, in [0, 1] pixel units, not 0-255: 8/255 ≈ 0.0314 "
        "(the default) lets each protected pixel move by 8 grey levels; '8/255' is accepted",
    )
    parser.add_argument("--steps", type=positive_int, default=STEPS, help=f"PGD iterations (default {STEPS})")
    parser.add_argument(
        "--step-size",
        type=pixel_units,
        default=STEP_SIZE,
        help="PGD step, in [0, 1] pixel units like --budget and at most it (default 0.5/255 ≈ 0.00196)",
    )
    parser.add_argument(
        "--no-augment",
        action="store_true",
        help="train against the given mask only (default for diffusionguard: random "
        "shrunken masks, so the protection holds for the attacker's own mask)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for noises and mask augmentation")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --output if it exists (never an input)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=cmd_protect)


def configure_edit(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "What an attacker does with a photo, and how to check a protection: the masked region "
        f"is kept, the rest is regenerated from --prompt. {SIZES} "
        "Python: diffalign.inpainting.edit(pipe, image, keep_mask, prompt)."
    )
    parser.add_argument("image", metavar="IMAGE", help="image to edit (PNG, JPEG, WebP, BMP)")
    parser.add_argument("--mask", required=True, help=MASKS.replace("protect", "keep"))
    parser.add_argument("--prompt", required=True, help="what to paint around the kept region")
    parser.add_argument("--output", "-o", required=True, help="edited image (.png recommended)")
    parser.add_argument("--model", default="shapes-inpaint", help=MODEL_HELP)
    parser.add_argument("--steps", type=positive_int, default=50, help="denoising steps (default 50)")
    parser.add_argument(
        "--guidance",
        type=non_negative_float,
        default=7.5,
        help="classifier-free guidance scale (default 7.5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the initial noise")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --output if it exists (never an input)"
    )
    parser.set_defaults(handler=cmd_edit)


def configure_app(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Starts the Gradio app on this machine only (127.0.0.1) unless --host says otherwise; "
        "no public link unless --share. Needs the app extra: pip install 'diffalign[app]'. "
        "Python: diffalign.app.launch(diffalign.app.create_app(pipe))."
    )
    parser.add_argument("--model", default="shapes-inpaint", help=MODEL_HELP)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes the app to the network)",
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument(
        "--share",
        action="store_true",
        help="also create a temporary public gradio.live link (off by default)",
    )
    parser.set_defaults(handler=cmd_app)


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
    psnr = images.psnr(inputs.image, images.load_image(path))
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
