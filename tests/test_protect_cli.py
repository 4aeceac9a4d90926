"""`diffalign protect` and `diffalign edit` end to end on tiny-random-inpaint, and every bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign import images, protection_io
from diffalign.cli import main
from diffalign.shapes import world

TINY = ["--model", "tiny-random-inpaint"]
BUDGET = 8 / 255
ROUNDING = 0.5 / 255  # the protected PNG is 8-bit: each pixel may be off by half a grey level


@pytest.fixture()
def files(tmp_path):
    """A 32 px ShapesWorld scene (tiny-random-inpaint's native size) and a mask over its middle."""
    scene = world.random_scene(np.random.default_rng(0), n_objects=2)
    image = tmp_path / "scene.png"
    Image.fromarray(world.render(scene, 32)).save(image)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 6:20] = 255
    mask_path = tmp_path / "mask.png"
    Image.fromarray(mask).save(mask_path)
    return image, mask_path


def protect(image, mask, output, *extra):
    # 4 steps of 4/255 against an 8/255 budget: enough to reach the budget, and quick.
    return main(
        [
            "protect",
            str(image),
            "--mask",
            str(mask),
            "-o",
            str(output),
            *TINY,
            "--steps",
            "4",
            "--step-size",
            "4/255",
            "--budget",
            "8/255",
            *extra,
        ]
    )


def test_protect_writes_a_png_perturbed_only_inside_the_mask_and_within_budget(files, tmp_path, capsys):
    image, mask = files
    output = tmp_path / "protected.png"
    assert protect(image, mask, output, "--no-progress") == 0
    out = capsys.readouterr().out
    assert "4 UNet calls" in out and "4 VAE calls" in out and "PSNR vs the original" in out

    original, protected = images.load_image(image), images.load_image(output)
    inside = images.load_image(mask)[:1] > 0.5  # [1, H, W]
    change = (protected - original).abs()
    assert change[:, ~inside[0]].max() == 0
    assert change[:, inside[0]].max() <= BUDGET + ROUNDING
    assert change[:, inside[0]].max() >= BUDGET - ROUNDING  # steps of 4/255 reach it somewhere
    printed_psnr = float(out.split("PSNR vs the original: ")[1].split(" dB")[0])
    assert printed_psnr == pytest.approx(images.psnr(original, protected), abs=0.01)


def test_protect_shows_a_progress_bar_driven_by_the_steps(files, tmp_path, capsys):
    image, mask = files
    assert protect(image, mask, tmp_path / "p.png", "--method", "photoguard") == 0
    assert "4/4" in capsys.readouterr().err


def test_edit_keeps_the_mask_and_writes_the_edit(files, tmp_path, capsys):
    image, mask = files
    output = tmp_path / "edit.png"
    argv = [
        "edit",
        str(image),
        "--mask",
        str(mask),
        "--prompt",
        "a red circle",
        "-o",
        str(output),
        *TINY,
        "--steps",
        "2",
    ]
    assert main(argv) == 0
    assert "a red circle" in capsys.readouterr().out
    edited = images.load_image(output)
    assert edited.shape == (3, 32, 32) and not torch.equal(edited, images.load_image(image))


def test_help_says_budget_is_in_unit_pixel_units(capsys):
    with pytest.raises(SystemExit):
        main(["protect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "[0, 1] pixel units" in text and "8/255" in text and "shapes-inpaint" in text


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("text-file", "is not a readable image"),
        ("truncated-png", "is not a readable image"),
        ("missing-image", "does not exist"),
        ("empty-mask", "nothing to protect"),
        ("corrupt-mask", "mask"),
        ("jpeg-output", "lossless PNG"),
        ("budget-in-grey-levels", "pass 0.0314"),
        ("not-inpainting", "text-to-image model"),
        ("missing-model-folder", "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_code_2(case, message, files, tmp_path, capsys, request):
    image, mask = files
    output, extra = tmp_path / "out.png", []
    if case == "text-file":
        image = tmp_path / "notes.png"
        image.write_text("this is not an image")
    elif case == "truncated-png":
        image = tmp_path / "truncated.png"
        image.write_bytes(files[0].read_bytes()[:60])
    elif case == "missing-image":
        image = tmp_path / "nowhere.png"
    elif case == "empty-mask":
        mask = tmp_path / "black.png"
        Image.new("L", (32, 32)).save(mask)
    elif case == "corrupt-mask":
        mask = tmp_path / "mask.jpg"
        mask.write_bytes(b"\xff\xd8\xff garbage")
    elif case == "jpeg-output":
        output = tmp_path / "out.jpg"
    elif case == "budget-in-grey-levels":
        extra = ["--budget", "8"]
    elif case == "not-inpainting":
        request.getfixturevalue("tiny_pipe").save_pretrained(tmp_path / "text-to-image")
        extra = ["--model", str(tmp_path / "text-to-image")]
    elif case == "missing-model-folder":
        extra = ["--model", str(tmp_path / "no-model")]
    assert protect(image, mask, output, "--no-progress", *extra) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if "error:" in line]
    assert line.startswith("diffalign protect: error:") and message in line
    assert not output.exists()


def test_edit_with_an_empty_mask_has_nothing_to_keep(files, tmp_path, capsys):
    image, _ = files
    mask = tmp_path / "black.png"
    Image.new("L", (32, 32)).save(mask)
    argv = ["edit", str(image), "--mask", str(mask), "--prompt", "x", "-o", str(tmp_path / "e.png"), *TINY]
    assert main(argv) == 2
    assert "nothing to keep" in capsys.readouterr().err


def test_huge_image_and_mask_of_another_size_are_resized_with_notices(tmp_path, capsys):
    """A 1500×1200 photo and a 300×240 mask: both fitted to tiny-random-inpaint's native 32×32."""
    gradient = np.linspace(0, 255, 1500, dtype=np.uint8)[None, :, None].repeat(1200, 0).repeat(3, 2)
    image = tmp_path / "huge.png"
    Image.fromarray(gradient).save(image)
    mask_array = np.zeros((240, 300), np.uint8)
    mask_array[:, :150] = 255  # the left half
    mask = tmp_path / "small-mask.png"
    Image.fromarray(mask_array).save(mask)
    output = tmp_path / "protected.png"
    assert protect(image, mask, output, "--no-progress") == 0
    err = capsys.readouterr().err
    assert "the mask is 300×240 px but the image is 1500×1200 px; resized the mask" in err
    assert "resized it to 32×32 px: this model works at its native 32×32 px only" in err
    protected = images.load_image(output)
    assert protected.shape == (3, 32, 32)
    reference = torch.from_numpy(
        np.asarray(Image.fromarray(gradient).resize((32, 32), Image.Resampling.LANCZOS), np.float32) / 255
    ).permute(2, 0, 1)
    change = (protected - reference).abs()
    assert change[:, :, 16:].max() == 0 and 0 < change[:, :, :16].max() <= BUDGET + ROUNDING


@pytest.mark.parametrize(
    ("size", "native", "expected"),
    [
        ((3000, 2000), 512, (1024, 680)),  # longest side capped at 1024, sides multiples of 8
        ((500, 301), 512, (496, 296)),  # small enough: only rounded to multiples of 8
        ((3000, 2000), 32, (32, 32)),  # a model trained at 32 px works at 32×32 only
        ((7, 7), 512, (8, 8)),  # never below one latent pixel
    ],
)
def test_working_size(size, native, expected):
    assert protection_io.working_size(*size, native=native, factor=8) == expected


def test_app_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real_find_spec(name, *a)
    )
    assert main(["app", *TINY]) == 2
    assert "pip install 'diffalign[app]'" in capsys.readouterr().err


def test_default_model_is_shapes_inpaint_and_its_missing_weights_are_one_clear_error(
    files, tmp_path, capsys, monkeypatch
):
    import diffalign.inpainting
    from diffalign.shapes.assets import ShapesWeightsError

    asked = []

    def missing(spec, **_):
        asked.append(spec)
        raise ShapesWeightsError("ShapesWorld weight file .../inpaint/unet/config.json is missing.")

    monkeypatch.setattr(diffalign.inpainting, "load_inpainting", missing)
    image, mask = files
    assert main(["protect", str(image), "--mask", str(mask), "-o", str(tmp_path / "p.png")]) == 2
    assert asked == ["shapes-inpaint"]
    err = capsys.readouterr().err
    assert "Traceback" not in err and "diffalign protect: error: ShapesWorld weight file" in err
