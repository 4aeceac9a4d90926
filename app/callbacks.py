"""What the app's buttons do: plain Python over diffalign's API, testable without a browser.

Each callback takes what the Gradio components hand over (PIL images, the image editor's
``{"background", "layers", "composite"}`` dict, numbers), calls ``diffalign.protection_io``,
``diffalign.defenses.protect`` or ``diffalign.inpainting.edit``, and returns what the output
components show. Input the user can fix (no image, nothing marked, a corrupt upload) becomes
a ``gr.Error`` with the library's own message; a change made to the input (resizing) becomes
a ``gr.Warning``, so nothing happens silently.
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from diffalign.defenses.diffusionguard import STEP_SIZE
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image

from diffalign import defenses, images, protection_io
from diffalign.inpainting import edit

EDIT_STEPS = 20  # enough for a recognisable edit, and twice 20 steps stay quick on a CPU
# Download folders are named diffalign-app-<pid>-..., so a later start can tell a dead app's from a live one's.
DOWNLOADS_PREFIX = "diffalign-app-"


def remove_stale_download_folders(parent: str | None = None) -> list[Path]:
    """Remove the download folders of apps that are no longer running (killed before they could clean up)."""
    removed = []
    for folder in Path(parent or tempfile.gettempdir()).glob(f"{DOWNLOADS_PREFIX}*-*"):
        pid = folder.name.removeprefix(DOWNLOADS_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass
class Protection:
    """The last protection in a browser session (kept in a ``gr.State``), which the edits attack."""

    original: torch.Tensor  # [3, H, W] in [0, 1]: the image as protected (at the model's working size)
    mask: torch.Tensor  # [1, H, W] binary, 1 = protected (kept by the editor)
    protected: torch.Tensor  # [3, H, W] in [0, 1]: exactly the pixels of the downloadable PNG


def user_error(message: str, title: str) -> gr.Error:
    """An error the user can fix: shown in the page (escaped, as Gradio renders HTML), no server traceback."""
    return gr.Error(html.escape(message), title=title, print_exception=False)


@contextmanager
def shown_to_user() -> Iterator[None]:
    """Turn the library's input errors (all ``ValueError``s that say how to fix them) into a ``gr.Error``."""
    try:
        yield
    except ValueError as error:
        raise user_error(str(error), "Cannot do that") from error


def painted_mask(editor: dict | None) -> np.ndarray | None:
    """``[H, W]`` in {0, 1}: where any brush layer of the editor has paint; None if nothing is painted."""
    layers = [np.asarray(layer.convert("RGBA"))[..., 3] > 0 for layer in (editor or {}).get("layers") or []]
    if not any(layer.any() for layer in layers):
        return None
    return np.logical_or.reduce(layers).astype(np.float32)


class Callbacks:
    """The app's callbacks, bound to one inpainting pipeline shared by all browser sessions.

    The UI runs every callback that touches the pipeline in one queue (``concurrency_id``),
    because a diffusers pipeline is not safe to call from two threads at once.
    """

    def __init__(self, pipe: StableDiffusionInpaintPipeline) -> None:
        self.pipe = pipe
        remove_stale_download_folders()
        # Protected PNGs to download; removed with this object, and at the latest when the app exits
        # (``launch`` turns SIGTERM into a normal shutdown so that this runs).
        self.downloads = Path(tempfile.mkdtemp(prefix=f"{DOWNLOADS_PREFIX}{os.getpid()}-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.downloads, ignore_errors=True)

    def close(self) -> None:
        """Remove the download folder now."""
        self._cleanup()

    def mask_preview(self, mask_file: str | None) -> np.ndarray | None:
        """Read an uploaded mask file through diffalign's image reader: what will be protected, or a clear error."""
        if not mask_file:
            return None
        with shown_to_user():
            mask = protection_io.mask_array(images.open_image(mask_file, role="mask"))
        return ((mask >= 0.5) * 255).astype(np.uint8)

    def inputs(self, editor: dict | None, mask_upload: str | Image.Image | None) -> protection_io.ModelInputs:
        """The editor's image and its mask (the uploaded file, else the painted one), fitted to the model."""
        background = (editor or {}).get("background")
        # Without an upload the editor still sends its blank canvas, fully transparent.
        if background is None or background.convert("RGBA").getextrema()[3][1] == 0:
            raise user_error("Upload an image first (or pick one of the examples).", "No image")
        painted = painted_mask(editor)
        if mask_upload is not None:
            if painted is not None:
                gr.Warning("Using the uploaded mask; the strokes painted on the image are ignored.")
            if not isinstance(mask_upload, Image.Image):  # an uploaded file: read as every command reads
                with shown_to_user():
                    mask_upload = images.open_image(mask_upload, role="mask")
            mask = protection_io.mask_array(mask_upload)
        elif painted is not None:
            mask = painted
        else:
            raise user_error(
                "Nothing to protect: paint over the region to protect (e.g. the face) with the brush, "
                "or upload a mask (white = protect).",
                "No region marked",
            )
        with shown_to_user():
            protection_io.check_mask(mask)
            fitted = protection_io.fit_to_model(self.pipe, background, mask)
        for notice in fitted.notices:
            gr.Warning(html.escape(notice))
        return fitted

    def protect(
        self,
        editor: dict | None,
        mask_upload: str | Image.Image | None,
        method: str,
        strength: float,
        steps: float,
        seed: float | None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - how Gradio hands a handler its tracker
    ) -> tuple[np.ndarray, str, str, Protection]:
        """Protect the marked region: (protected image, PNG path, summary markdown, state for the edits).

        ``strength`` is the budget in grey levels of 255 (the UI's unit); the step size is
        DiffusionGuard's 0.5/255, which is below every budget the UI offers.
        """
        fitted = self.inputs(editor, mask_upload)
        budget = strength / 255
        steps = int(steps)

        def report(step: int, total: int, value: float) -> None:
            progress((step, total), desc=f"{method}: objective {value:.4g}", unit="steps")

        with shown_to_user():
            result = defenses.protect(
                self.pipe,
                fitted.image,
                fitted.mask,
                method=method,
                budget=budget,
                step_size=min(STEP_SIZE, budget),
                steps=steps,
                generator=_generator(seed),
                progress=report,
            )
        path = images.save_image(result.image, self.downloads / uuid.uuid4().hex / "protected.png")
        protected = images.load_image(path)  # the 8-bit pixels the user downloads, which the edits attack
        height, width = protected.shape[-2:]
        area = fitted.mask.mean().item()
        summary = (
            f"**{method}**, {steps} steps, strength {strength:g}/255 on {area:.0%} of the "
            f"{width}×{height} px image: {result.unet_calls} UNet and {result.vae_calls} VAE calls in "
            f"{result.seconds:.1f} s. PSNR against the original: "
            f"{images.psnr(fitted.image, protected):.1f} dB."
        )
        state = Protection(original=fitted.image, mask=fitted.mask, protected=protected)
        return _to_array(protected), str(path), summary, state

    def edit_pair(
        self,
        state: Protection | None,
        prompt: str,
        edit_steps: float,
        seed: float | None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - how Gradio hands a handler its tracker
    ) -> tuple[np.ndarray, np.ndarray]:
        """The attacker's edit (keep the protected region, repaint the rest) of both images.

        Both edits start from the same noise, so any difference between them is the protection's doing.
        """
        if state is None:
            raise user_error(
                "Protect an image first; the edit attempt runs on the result.", "Nothing to edit"
            )
        outputs = []
        for index, (name, image) in enumerate(
            (("original", state.original), ("protected image", state.protected))
        ):
            progress((index, 2), desc=f"editing the {name}", unit="edits")
            with shown_to_user():
                edited = edit(
                    self.pipe,
                    image,
                    state.mask,
                    prompt,
                    steps=int(edit_steps),
                    generator=_generator(seed),
                )
            outputs.append(_to_array(edited))
        return outputs[0], outputs[1]


def _generator(seed: float | None) -> torch.Generator:
    """A CPU generator seeded from the seed box, which sends None when the user cleared it (then seed 0)."""
    return torch.Generator().manual_seed(int(seed or 0))


def _to_array(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] → ``[H, W, 3]`` uint8, what ``gr.Image`` shows without converting again."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
