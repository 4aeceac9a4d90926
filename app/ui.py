"""The app's page: mark a region, protect it, download the result, and watch an edit attempt fail.

``create_app(pipe)`` builds the ``gr.Blocks``; ``launch(app)`` serves it on this machine only
(127.0.0.1) unless told otherwise, with no public link unless ``share=True``.
"""

from __future__ import annotations

import gradio as gr
from diffalign.app import example_images
from diffalign.app.callbacks import EDIT_STEPS, Callbacks
from diffalign.defenses.diffusionguard import BUDGET, STEPS
from diffusers import StableDiffusionInpaintPipeline

from diffalign import defenses, protection_io

INTRO = """\
## Protect a photo against inpainting edits
Mark the region you want to keep safe (a face, say): an editor that keeps that region and
repaints everything else from a prompt is what this protection breaks. **1.** Upload an image and
paint over the region with the brush (or upload a mask: white = protect). **2.** Choose the strength
(the largest change of any pixel, in grey levels) and the number of steps, type what an attacker
might ask for, and press *Protect*. You get the protected PNG to download, and the same edit run
on the original and on the protected image, side by side.
"""

# Shown images fill their boxes, so a small model's 32 px images are scaled up, with sharp pixels.
CSS = ".scaled img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"
RESULT_HEIGHT = 300
# A brush that shows what is underneath it: any paint counts as protected, whatever its opacity.
BRUSH_COLOUR = "rgba(255, 0, 200, 0.55)"
LARGEST_STEPS = 1000
LARGEST_STRENGTH = 32  # grey levels; beyond that the perturbation is plainly visible


def create_app(pipe: StableDiffusionInpaintPipeline) -> gr.Blocks:
    """The app for one inpainting pipeline (``diffalign.inpainting.load_inpainting``)."""
    callbacks = Callbacks(pipe)
    native = protection_io.native_side(pipe)
    # The editor's canvas is the image itself, so brush sizes are in image pixels: on a model
    # trained at 32 px that is where the images are, and a 4 px brush is a usable tip;
    # elsewhere Gradio's own default (1/50 of the image's shorter side) scales with the photo.
    brush_size = max(1, native // 8) if native < protection_io.FIXED_RESOLUTION_BELOW else "auto"
    # delete_cache: Gradio's copies of uploads go when the app stops (and hourly, after an hour).
    with gr.Blocks(
        title="diffalign: protect an image", analytics_enabled=False, delete_cache=(3600, 3600)
    ) as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column():
                editor = gr.ImageEditor(
                    label="Image: paint over the region to protect",
                    type="pil",
                    image_mode="RGBA",
                    sources=("upload", "clipboard"),
                    layers=False,
                    transforms=(),
                    brush=gr.Brush(colors=[BRUSH_COLOUR], color_mode="fixed", default_size=brush_size),
                    elem_id="editor",
                )
                # A file, not gr.Image: Gradio would decode (and for 16-bit masks, saturate) the upload
                # itself, and report a bad file as "could not preprocess"; diffalign's reader says why.
                mask_upload = gr.File(
                    label="…or upload a mask (white = protect)",
                    file_types=["image"],
                    type="filepath",
                    height=60,
                    elem_id="mask-upload",
                )
                mask_preview = gr.Image(
                    label="Uploaded mask, as read (white = protected)",
                    type="numpy",
                    interactive=False,
                    height=120,
                    elem_id="mask-preview",
                    elem_classes="scaled",
                )
            with gr.Column():
                method = gr.Dropdown(
                    list(defenses.METHODS),
                    value="diffusionguard",
                    label="Method",
                    info="DiffusionGuard (Choi et al. 2025); PhotoGuard and AdvDM are baselines",
                )
                strength = gr.Slider(
                    1,
                    LARGEST_STRENGTH,
                    value=round(BUDGET * 255),
                    step=1,
                    label="Strength (grey levels of 255)",
                    info="largest change of a protected pixel: the budget in [0, 1] units is strength / 255",
                    elem_id="strength",
                )
                steps = gr.Slider(
                    1,
                    LARGEST_STEPS,
                    value=STEPS,
                    step=1,
                    label="Steps",
                    info="optimisation steps: more is stronger and slower",
                    elem_id="steps",
                )
                prompt = gr.Textbox(
                    label="Edit prompt (what an attacker might ask for)",
                    value=example_images.EXAMPLES[0].attack,
                    elem_id="prompt",
                )
                with gr.Accordion("Edit settings", open=False):
                    edit_steps = gr.Slider(1, 100, value=EDIT_STEPS, step=1, label="Edit denoising steps")
                    seed = gr.Number(0, precision=0, label="Seed (protection noise and edit noise)")
                protect_button = gr.Button("Protect", variant="primary", elem_id="protect")
                summary = gr.Markdown(elem_id="summary")
        with gr.Row():
            with gr.Column():
                protected = gr.Image(
                    label="Protected image",
                    type="numpy",
                    format="png",
                    interactive=False,
                    elem_id="protected",
                    elem_classes="scaled",
                    height=RESULT_HEIGHT,
                )
                download = gr.File(label="Download the protected PNG", interactive=False, elem_id="download")
            edit_original = gr.Image(
                label="Edit of the original",
                format="png",
                interactive=False,
                elem_id="edit-original",
                elem_classes="scaled",
                height=RESULT_HEIGHT,
            )
            edit_protected = gr.Image(
                label="Edit of the protected image",
                format="png",
                interactive=False,
                elem_id="edit-protected",
                elem_classes="scaled",
                height=RESULT_HEIGHT,
            )
        edit_button = gr.Button("Edit again with this prompt", elem_id="edit")
        gr.Examples(
            [
                [str(path) for path in example_images.paths(example)] + [example.attack]
                for example in example_images.EXAMPLES
            ],
            inputs=[editor, mask_upload, prompt],
            label="Examples: ShapesWorld scenes, with a mask over the object to protect",
        )
        state = gr.State()
        mask_upload.change(callbacks.mask_preview, [mask_upload], [mask_preview])

        # One queue for everything that runs the pipeline: it must not run in two threads at once.
        protect_button.click(
            callbacks.protect,
            [editor, mask_upload, method, strength, steps, seed],
            [protected, download, summary, state],
            concurrency_id="pipeline",
        ).success(
            callbacks.edit_pair,
            [state, prompt, edit_steps, seed],
            [edit_original, edit_protected],
            concurrency_id="pipeline",
        )
        edit_button.click(
            callbacks.edit_pair,
            [state, prompt, edit_steps, seed],
            [edit_original, edit_protected],
            concurrency_id="pipeline",
        )
    return app


def launch(
    app: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False, **options
) -> None:
    """Serve ``app`` at ``host:port``; blocks until interrupted unless ``prevent_thread_lock=True`` is passed.

    ``share`` is passed explicitly because Gradio's own default turns public links on in
    notebooks; uploads are capped so that a huge file is refused before it is decoded.
    """
    _stop_on_sigterm()
    app.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        share=share,
        show_error=True,
        max_file_size="50mb",
        css=CSS,
        **options,
    )


def _stop_on_sigterm() -> None:
    """Treat SIGTERM (``kill``, a service manager) like Ctrl-C, so the app shuts down normally and
    removes its temporary files instead of leaving them behind."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
