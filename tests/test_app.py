"""The app's callbacks and `diffalign app`, without a browser, on tiny-random-inpaint."""

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the app needs the app extra: pip install 'diffalign[app]'")

from diffalign.app import example_images
from diffalign.app.callbacks import Callbacks

from diffalign.cli import main
from diffalign.inpainting import load_inpainting

STRENGTH = 8  # grey levels


@pytest.fixture(scope="module")
def callbacks():
    return Callbacks(load_inpainting("tiny-random-inpaint"))


def example():
    """The first shipped example as the editor sends it: RGBA background, one brush layer, and its mask."""
    image_path, mask_path = example_images.paths(example_images.EXAMPLES[0])
    background = Image.open(image_path).convert("RGBA")
    mask = np.asarray(Image.open(mask_path).convert("L")) > 127
    layer = np.zeros((*mask.shape, 4), np.uint8)
    layer[mask] = (255, 0, 200, 255)
    editor = {"background": background, "layers": [Image.fromarray(layer)], "composite": None}
    return editor, np.asarray(background.convert("RGB")).astype(int), mask


def test_examples_are_shipped_shapesworld_renders_with_masks():
    for item in example_images.EXAMPLES:
        image_path, mask_path = example_images.paths(item)
        image, mask = Image.open(image_path), np.asarray(Image.open(mask_path).convert("L"))
        assert image.size == (32, 32) and mask.shape == (32, 32)
        assert 0 < (mask > 127).mean() < 0.5  # one object of the scene, not the whole picture


def test_protect_perturbs_the_painted_region_within_the_strength(callbacks):
    editor, original, painted = example()
    protected, path, summary, state = callbacks.protect(editor, None, "diffusionguard", STRENGTH, 3, 0)
    change = np.abs(protected.astype(int) - original)
    assert change[~painted].max() == 0
    assert 0 < change[painted].max() <= STRENGTH
    assert np.array_equal(
        np.asarray(Image.open(path).convert("RGB")), protected
    )  # the download is what is shown
    assert "3 UNet" in summary and "PSNR" in summary
    assert state.mask.bool()[0].numpy().tolist() == painted.tolist()


def test_uploaded_mask_wins_over_strokes_with_a_warning(callbacks):
    editor, original, _ = example()
    upload = np.zeros((32, 32), np.uint8)
    upload[:, 16:] = 255  # the right half, away from the painted object
    with pytest.warns(UserWarning, match="Using the uploaded mask"):
        protected, *_ = callbacks.protect(editor, Image.fromarray(upload), "photoguard", STRENGTH, 2, 0)
    change = np.abs(protected.astype(int) - original)
    assert change[:, :16].max() == 0 and change[:, 16:].max() > 0


def test_edit_pair_edits_the_original_and_the_protected_image_from_the_same_noise(callbacks):
    editor, *_ = example()
    *_, state = callbacks.protect(editor, None, "diffusionguard", STRENGTH, 2, 0)
    first = callbacks.edit_pair(state, "a red circle left of a yellow triangle", 2, 0)
    again = callbacks.edit_pair(state, "a red circle left of a yellow triangle", 2, 0)
    assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for image in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(*first)  # the protection is the only difference between the two inputs


def test_huge_upload_is_resized_with_a_warning(callbacks):
    editor = {
        "background": Image.new("RGBA", (2000, 1500), (90, 120, 200, 255)),
        "composite": None,
        "layers": [Image.new("RGBA", (2000, 1500), (255, 0, 200, 255))],
    }
    with pytest.warns(UserWarning, match="resized it to 32×32 px"):
        protected, *_ = callbacks.protect(editor, None, "diffusionguard", STRENGTH, 1, 0)
    assert protected.shape == (32, 32, 3)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no-image", "Upload an image first"),
        ("blank-canvas", "Upload an image first"),
        ("nothing-marked", "Nothing to protect"),
        ("black-mask", "nothing to protect"),
        ("mask-vanishes", "vanished"),
    ],
)
def test_bad_input_is_a_clear_error_in_the_ui(case, message, callbacks):
    editor, *_ = example()
    upload = None
    if case == "no-image":
        editor = None
    elif case == "blank-canvas":  # what the editor sends when the user paints before uploading
        editor["background"] = Image.new("RGBA", (800, 800), (0, 0, 0, 0))
    elif case == "nothing-marked":
        editor["layers"] = [Image.new("RGBA", (32, 32), (0, 0, 0, 0))]
    elif case == "black-mask":
        editor["layers"], upload = [], Image.new("L", (32, 32))
    elif case == "mask-vanishes":  # one marked pixel of 1000×1000, resized to 32×32
        editor["background"] = Image.new("RGBA", (1000, 1000), (90, 120, 200, 255))
        layer = Image.new("RGBA", (1000, 1000), (0, 0, 0, 0))
        layer.putpixel((500, 500), (255, 0, 200, 255))
        editor["layers"] = [layer]
    with pytest.raises(gr.Error, match=message):
        callbacks.protect(editor, upload, "diffusionguard", STRENGTH, 1, 0)


def test_edit_before_protecting_is_a_clear_error(callbacks):
    with pytest.raises(gr.Error, match="Protect an image first"):
        callbacks.edit_pair(None, "a cat", 2, 0)


def test_app_command_serves_on_localhost_without_a_public_link(monkeypatch):
    import diffalign.app

    launched = {}
    monkeypatch.setattr(diffalign.app, "launch", lambda app, **options: launched.update(app=app, **options))
    assert main(["app", "--model", "tiny-random-inpaint", "--port", "7999"]) == 0
    assert isinstance(launched.pop("app"), gr.Blocks)
    assert launched == {"host": "127.0.0.1", "port": 7999, "share": False}


def test_app_command_with_a_bad_model_is_one_clear_line(tmp_path, capsys):
    assert main(["app", "--model", str(tmp_path / "no-model")]) == 2
    assert "does not exist" in capsys.readouterr().err
