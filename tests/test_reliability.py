"""diffalign's reliability promises, each tried the way a user breaks it (see docs/reliability.md).

No input is ever overwritten; a new run never writes into a folder that holds something else;
resume refuses a changed experiment; every image mode Pillow opens is read by what its values
mean or refused by name; faults of the machine are one line with what was kept; interrupted
writes leave nothing behind; messages name what was wrong.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign import checkpoint, config, images, outputs, rewards
from diffalign.cli import main

TINY = [
    "method=ddpo",
    "model=tiny-random",
    "reward=jpeg-compressibility",
    "prompts=simple-animals",
    "eval.prompt_sets=[]",
    "eval.rewards=[]",
    "eval.size=4",
    "sample.num_steps=3",
    "sample.batch_size=4",
    "sample.num_batches_per_epoch=1",
    "train.batch_size=2",
    "tensorboard=false",
]


def train_args(output: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--no-progress",
        *[a for item in (*TINY, *extra) for a in ("--set", item)],
        "--output-dir",
        str(output),
    ]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: 'nothing was changed' made checkable."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def scene(tmp_path):
    """An image and its mask, as a user has them."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 4:16] = (220, 30, 30)
    image[8:24, 18:30] = (30, 30, 220)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:16] = 255
    Image.fromarray(image).save(tmp_path / "victim.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path / "victim.png", tmp_path / "mask.png"


# 1. No input is ever overwritten; no output is replaced unless asked.


@pytest.mark.parametrize("command", ["protect", "edit"])
@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink", "mask"])
def test_output_equal_to_an_input_is_refused_and_the_input_kept(command, spelling, scene, capsys):
    image, mask = scene
    before = {path: path.read_bytes() for path in (image, mask)}
    output = {
        "same": image,
        "dotted": image.parent / "sub" / ".." / image.name,
        "symlink": image.parent / "link.png",
        "mask": mask,
    }[spelling]
    (image.parent / "sub").mkdir(exist_ok=True)
    if spelling == "symlink":
        output.symlink_to(image)
    extra = ["--steps", "1"] if command == "protect" else ["--prompt", "a cat", "--steps", "1"]
    argv = [
        command,
        str(image),
        "--mask",
        str(mask),
        "-o",
        str(output),
        "--model",
        "tiny-random-inpaint",
        "--overwrite",
        *extra,
    ]
    assert main(argv) == 2
    assert "never overwrites an input" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in before} == before


@pytest.mark.parametrize("command", ["protect", "edit"])
def test_existing_output_needs_overwrite(command, scene, capsys):
    image, mask = scene
    output = image.parent / "out.png"
    output.write_bytes(b"the user's own file")
    extra = (
        ["--steps", "1", "--no-progress"] if command == "protect" else ["--prompt", "a cat", "--steps", "1"]
    )
    argv = [
        command,
        str(image),
        "--mask",
        str(mask),
        "-o",
        str(output),
        "--model",
        "tiny-random-inpaint",
        *extra,
    ]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert output.read_bytes() == b"the user's own file"
    assert main([*argv, "--overwrite"]) == 0
    assert images.load_image(output).shape == (3, 32, 32)


def test_sample_and_score_never_overwrite_their_inputs(tmp_path, capsys):
    prompts = tmp_path / "out" / "prompts.txt"
    prompts.parent.mkdir()
    prompts.write_text("a cat\na dog\n")
    argv = ["sample", "--prompts", str(prompts), "-n", "2", "--steps", "1", "-o", str(prompts.parent)]
    assert main([*argv, "--overwrite"]) == 2  # sample writes prompts.txt into its folder: that is the input
    assert "never overwrites an input" in capsys.readouterr().err
    assert prompts.read_text() == "a cat\na dog\n"

    folder = tmp_path / "imgs"
    assert main(["sample", "--prompt", "a cat", "-n", "2", "--steps", "1", "-o", str(folder)]) == 0
    assert main(["sample", "--prompt", "a cat", "-n", "2", "--steps", "1", "-o", str(folder)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    captions = tmp_path / "captions.txt"
    captions.write_text("a cat\na cat\na cat\n")
    argv = [
        "score",
        "--reward",
        "jpeg-compressibility",
        "--images",
        str(folder),
        "--captions",
        str(captions),
        "-o",
        str(captions),
    ]
    assert main(argv) == 2
    assert "never overwrites an input" in capsys.readouterr().err
    assert captions.read_text() == "a cat\na cat\na cat\n"


# 2. A new run goes only into a new or empty folder.


def test_new_run_in_a_folder_with_files_but_no_checkpoint_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    user_config = run / "config.yaml"
    user_config.write_text("# my experiment\nepochs: 1\n")
    (run / "notes.txt").write_text("keep me")
    before = snapshot(run)
    assert main(["train", str(user_config), *train_args(run)[1:]]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "config.yaml" in err
    assert snapshot(run) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(train_args(empty, "epochs=1")) == 0


def test_output_dir_that_is_a_file_is_one_clear_line(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("x")
    assert main(train_args(target, "epochs=1")) == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "x"


# 3. Resume continues the run's own experiment, or refuses.


def test_resume_from_the_output_dir_alone_loads_the_runs_config(tmp_path, capsys):
    run = tmp_path / "run"
    # A run whose settings differ from the defaults in ways that change the weights' shapes.
    assert main(train_args(run, "epochs=1", "lora.rank=2", "train.learning_rate=3e-3")) == 0
    capsys.readouterr()
    assert main(["train", "--no-progress", "--output-dir", str(run), "--resume", "--set", "epochs=2"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert resumes[0]["epoch"] == 1 and resumes[0]["changes"] == {"epochs": [1, 2]}
    assert "epochs: 2" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("change", ["reward=aesthetic", "train.learning_rate=0.5", "seed=3", "method=dpok"])
def test_resume_with_another_experiment_is_refused_with_a_diff(change, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, "epochs=1")) == 0
    before = snapshot(run)
    capsys.readouterr()
    extra = ["reward_options={checkpoint: tiny-random}"] if change.startswith("reward") else []
    assert main([*train_args(run, "epochs=2", change, *extra), "--resume"]) == 2
    err = capsys.readouterr().err
    key = change.split("=")[0]
    assert "would change the experiment" in err and f"  {key}:" in err
    assert "epochs" not in err.split("refused")[1].split("Resume with")[0]  # bookkeeping is not listed
    assert snapshot(run) == before


def test_resume_with_more_processes_says_what_changes(tmp_path):
    run = tmp_path / "run"
    assert main(train_args(run, "epochs=1")) == 0
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "diffalign.cli",
        *train_args(run, "epochs=2"),
        "--resume",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "with 2 processes where it ran with 1" in result.stderr
    assert "8 images instead of 4" in result.stderr
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert resumes[-1]["changes"]["processes"] == [1, 2]


# 4. Every image mode is read by what its values mean, or refused by name.


def png_bytes(width: int, height: int, colour_type: int, depth: int, pixel: tuple[int, ...]) -> bytes:
    """A PNG written byte by byte (no Pillow), so the test does not share the reader's assumptions."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    fmt = ">" + ("H" if depth == 16 else "B") * len(pixel)
    rows = b"".join(b"\x00" + struct.pack(fmt, *pixel) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def pillow_bytes(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _palette_image() -> Image.Image:
    image = Image.new("P", (4, 4), 1)  # every pixel is palette entry 1
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    return image


# (file bytes, expected [R, G, B] mean in [0, 1]); transparent pixels are shown on white.
MODES = {
    "16-bit grey PNG": (png_bytes(4, 4, 0, 16, (0x4000,)), [0x4000 / 65535] * 3),
    "16-bit grey PNG, black": (png_bytes(4, 4, 0, 16, (0,)), [0.0] * 3),
    "16-bit RGB PNG": (png_bytes(4, 4, 2, 16, (0x8000, 0x4000, 0xFFFF)), [128 / 255, 64 / 255, 1.0]),
    "16-bit grey+alpha PNG": (png_bytes(4, 4, 4, 16, (0x0000, 0xFFFF)), [0.0] * 3),
    "16-bit RGBA PNG, half transparent": (png_bytes(4, 4, 6, 16, (0, 0, 0, 0x8000)), [1 - 128 / 255] * 3),
    "8-bit grey PNG": (png_bytes(4, 4, 0, 8, (51,)), [0.2] * 3),
    "1-bit PNG": (pillow_bytes(Image.new("1", (4, 4), 1), "PNG"), [1.0] * 3),
    "palette PNG": (pillow_bytes(_palette_image(), "PNG"), [10 / 255, 200 / 255, 30 / 255]),
    "palette PNG with a transparent colour": (
        pillow_bytes(Image.new("P", (4, 4), 0), "PNG", transparency=0),
        [1.0] * 3,
    ),
    "CMYK JPEG (pure cyan)": (
        pillow_bytes(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG", quality=100),
        [0.0, 1.0, 1.0],
    ),
    "CMYK TIFF (red)": (pillow_bytes(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "TIFF"), [1.0, 0.0, 0.0]),
    "LA PNG, transparent": (pillow_bytes(Image.new("LA", (4, 4), (0, 0)), "PNG"), [1.0] * 3),
    "RGBA PNG, opaque": (pillow_bytes(Image.new("RGBA", (4, 4), (255, 0, 0, 255)), "PNG"), [1.0, 0.0, 0.0]),
    "32-bit integer TIFF within 16 bits": (
        pillow_bytes(Image.fromarray(np.full((4, 4), 65535, np.int32)), "TIFF"),
        [1.0] * 3,
    ),
}


@pytest.mark.parametrize("name", list(MODES))
def test_each_image_mode_is_read_by_its_meaning(name, tmp_path):
    data, expected = MODES[name]
    path = tmp_path / ("image.tif" if "TIFF" in name else "image.jpg" if "JPEG" in name else "image.png")
    path.write_bytes(data)
    pixels = images.load_image(path)
    assert pixels.shape[0] == 3
    tolerance = 0.02 if "JPEG" in name else 1 / 255
    assert pixels.mean(dim=(1, 2)).tolist() == pytest.approx(expected, abs=tolerance)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (Image.fromarray(np.full((4, 4), 0.5, np.float32)), "floating-point"),
        (Image.fromarray(np.full((4, 4), 100_000, np.int32)), "outside the 16-bit range"),
    ],
    ids=["float", "int32-out-of-range"],
)
def test_modes_without_a_meaning_are_refused_by_name(image, message, tmp_path, capsys):
    path = tmp_path / "odd.tif"
    image.save(path)
    with pytest.raises(images.ImageError, match=message):
        images.load_image(path)
    assert main(["score", "--reward", "jpeg-compressibility", "--images", str(tmp_path)]) == 2
    assert "odd.tif" in capsys.readouterr().err


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((10, 20, 3), np.uint8)  # 20 wide, 10 high, as the camera stored it
    stored[:, :10] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    upright = images.load_image(tmp_path / "photo.jpg")
    assert upright.shape == (3, 20, 10)  # shown portrait
    assert upright[:, :10].mean() > 0.9 and upright[:, 10:].mean() < 0.1  # the white half is now on top


def test_sixteen_bit_inputs_reach_the_commands_unsaturated(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "dark.png").write_bytes(png_bytes(32, 32, 0, 16, (0x1000,)))
    csv_path = tmp_path / "scores.csv"
    assert (
        main(["score", "--reward", "jpeg-compressibility", "--images", str(folder), "-o", str(csv_path)]) == 0
    )
    expected = rewards.build("jpeg-compressibility")(torch.full((1, 3, 32, 32), 16 / 255), [""]).item()
    assert float(csv_path.read_text().splitlines()[1].split(",")[-1]) == pytest.approx(expected)

    # A 16-bit mask marking the left half: only the left half may be perturbed.
    left = np.zeros((32, 32), np.uint16)
    left[:, :16] = 65535
    mask = tmp_path / "mask16.png"
    Image.fromarray(left).save(mask)
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (120, 90, 60)).save(image)
    out = tmp_path / "protected.png"
    argv = [
        "protect",
        str(image),
        "--mask",
        str(mask),
        "-o",
        str(out),
        "--model",
        "tiny-random-inpaint",
        "--steps",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    change = (images.load_image(out) - images.load_image(image)).abs().amax(dim=0)
    assert change[:, 16:].max() == 0 and change[:, :16].max() > 0


# 5. Faults of the machine and impossible arguments: one line, non-zero exit, what was kept.


@pytest.fixture()
def immutable(tmp_path):
    """A folder nobody, root included, can write into (ext4's immutable flag)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if (
        shutil.which("chattr") is None
        or subprocess.run(["chattr", "+i", str(folder)], check=False).returncode != 0
    ):
        pytest.skip("chattr +i is not available on this file system")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_read_only_output_folder_is_one_line_before_any_work(immutable, scene, capsys):
    image, mask = scene
    argv = [
        "protect",
        str(image),
        "--mask",
        str(mask),
        "-o",
        str(immutable / "out.png"),
        "--model",
        "tiny-random-inpaint",
        "--steps",
        "1",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not writable" in err
    assert main(train_args(immutable / "run", "epochs=1")) == 2
    assert "not writable" in capsys.readouterr().err


def test_full_disk_during_a_checkpoint_says_so_and_leaves_no_debris(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(train_args(run, "epochs=1")) == 0
    capsys.readouterr()
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        if "optimizer" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    assert main([*train_args(run, "epochs=2"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no space left" in err and "kept: the last complete checkpoint, epoch-0001" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001", "latest"]


@rewards.register(
    "test-overflowing", description="a reward too large to average (tests)", differentiable=True
)
class OverflowingReward:
    """Finite per image (so it passes the reward checks) but its mean overflows: the loss diverges."""

    name, differentiable = "test-overflowing", True

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3)) * 0 + 3.3e38


def test_diverged_loss_is_one_line_with_what_was_kept(tmp_path, capsys):
    run = tmp_path / "run"
    argv = train_args(
        run, "epochs=1", "method=alignprop", "reward=test-overflowing", "sample.images_per_prompt=1"
    )
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "loss is -inf; stopping before the update" in err and "Traceback" not in err
    assert "kept: no checkpoint had been written yet" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "--steps", "0"],
        ["sample", "-n", "-2"],
        ["sample", "--batch-size", "0"],
        ["edit", "x.png", "--mask", "m.png", "--prompt", "p", "-o", "o.png", "--steps", "0"],
        ["protect", "x.png", "--mask", "m.png", "-o", "o.png", "--steps", "-1"],
        ["sample", "--eta", "nan"],
    ],
)
def test_zero_or_negative_counts_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "must be" in err and "Traceback" not in err


def test_programming_errors_keep_their_traceback(monkeypatch):
    import diffalign.cli.rewards

    def broken(args):
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr(diffalign.cli.rewards, "cmd_rewards", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["rewards"])


# 6. Interrupted writes leave nothing behind.


def test_leftovers_of_interrupted_checkpoints_are_removed_on_resume(tmp_path):
    run = tmp_path / "run"
    assert main(train_args(run, "epochs=1")) == 0
    checkpoints = run / "checkpoints"
    debris = [
        checkpoints / ".tmp-epoch-0002-abc",
        checkpoints / f"{outputs.TEMPORARY_PREFIX}epoch-0002-x",
        checkpoints / ".latest.q1w2e3",
        run / f"{outputs.TEMPORARY_PREFIX}metrics-1.jsonl",
    ]
    for path in debris[:2]:
        path.mkdir()
        (path / "optimizer.pt").write_bytes(b"\0" * 1024)
    for path in debris[2:]:
        path.write_text("epoch-0002")
    assert main([*train_args(run, "epochs=2"), "--resume"]) == 0
    assert not any(path.exists() for path in debris)
    assert checkpoint.latest(checkpoints).name == "epoch-0002"


def test_a_failed_atomic_write_leaves_neither_the_file_nor_its_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), outputs.replacing(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_app_download_folder_goes_on_close_and_stale_ones_on_the_next_start(tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    import tempfile

    from diffalign.app import callbacks

    from diffalign.inpainting import load_inpainting

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{callbacks.DOWNLOADS_PREFIX}{dead.pid}-old"
    (stale / "x").mkdir(parents=True)
    live = tmp_path / f"{callbacks.DOWNLOADS_PREFIX}1-other-app"  # pid 1 is always running
    live.mkdir()
    app = callbacks.Callbacks(load_inpainting("tiny-random-inpaint"))
    assert not stale.exists() and live.exists()
    assert app.downloads.is_dir() and app.downloads.parent == tmp_path
    app.close()
    assert not app.downloads.exists()


def test_app_stopped_with_sigterm_removes_its_temporary_folder(tmp_path):
    pytest.importorskip("gradio")
    import os
    import signal
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "TMPDIR": str(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen(
        [sys.executable, "-m", "diffalign.cli", "app", "--model", "tiny-random-inpaint", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("diffalign-app-*")) or not _listening(port):
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read().decode()[
                -2000:
            ]
            time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    finally:
        server.kill()
    assert not list(tmp_path.glob("diffalign-app-*"))


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as client:
        return client.connect_ex(("127.0.0.1", port)) == 0


# 7. Messages that help.


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--set", "model=shape"], "did you mean 'shapes'"),
        (["sample", "--model", "tiny-randon", "--prompt", "a cat"], "did you mean 'tiny-random'"),
        (
            [
                "edit",
                "{img}",
                "--mask",
                "{mask}",
                "--prompt",
                "a",
                "-o",
                "{tmp}/o.png",
                "--model",
                "shapes-inpant",
            ],
            "did you mean 'shapes-inpaint'",
        ),
        (
            ["sample", "--model", "tiny-random", "--prompt", "a cat", "--lora", "{tmp}/no-such-lora"],
            "--lora '{tmp}/no-such-lora' is not a folder",
        ),
        (["sample", "--prompts", "{tmp}/latin1.txt"], "latin1.txt' is not UTF-8"),
    ],
)
def test_messages_name_what_was_wrong(argv, message, scene, tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("un caf\xe9\n".encode("latin-1"))
    image, mask = scene
    fill = {"{tmp}": str(tmp_path), "{img}": str(image), "{mask}": str(mask)}
    for key, value in fill.items():
        argv = [part.replace(key, value) for part in argv]
        message = message.replace(key, value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.lower() in err.lower() and "huggingface-cli" not in err


def test_a_long_prompt_is_reported_once_not_at_every_call(tiny_pipe, caplog):
    from diffalign.sampling import sample

    long_prompt = "a red circle left of a blue square " * 12
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            sample(tiny_pipe, [long_prompt, "a cat", long_prompt], num_steps=1)
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 1 and "text encoder reads 77" in said[0]


def test_a_long_prompt_to_a_flow_model_is_reported_once_too(caplog):
    from diffalign import pipeline
    from diffalign.sampling import sample

    flow_pipe = pipeline.load("tiny-random-flow")
    limit = flow_pipe.tokenizer.model_max_length
    long_prompt = "a red circle left of a blue square " * 12
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            sample(flow_pipe, [long_prompt, "a cat", long_prompt], num_steps=1)
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 1 and f"text encoder reads {limit}" in said[0]


def test_metric_keys_name_a_prompt_file_by_its_stem(tmp_path):
    from diffalign.train import train

    prompts = tmp_path / "deep" / "folder" / "my-prompts.txt"
    prompts.parent.mkdir(parents=True)
    prompts.write_text("a cat\na dog\n")
    overrides = [*TINY, "epochs=1", f"output_dir={tmp_path / 'run'}", f"eval.prompt_sets=[{prompts}]"]
    result = train(config.load_config(None, overrides), progress=False)
    keys = [key for key in result.history[-1] if key.startswith("eval/")]
    assert keys == ["eval/my-prompts/jpeg-compressibility"]


def test_bad_mask_upload_in_the_app_is_the_readers_message(tmp_path):
    gr = pytest.importorskip("gradio")
    from diffalign.app.callbacks import Callbacks

    from diffalign.inpainting import load_inpainting

    app = Callbacks(load_inpainting("tiny-random-inpaint"))
    bad = tmp_path / "mask.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(gr.Error, match="mask .*mask.png.* is not a readable image"):
        app.mask_preview(str(bad))
    sixteen = tmp_path / "mask16.png"
    left = np.zeros((32, 32), np.uint16)
    left[:, :16] = 65535
    Image.fromarray(left).save(sixteen)
    preview = app.mask_preview(str(sixteen))
    assert preview[:, :16].min() == 255 and preview[:, 16:].max() == 0  # not saturated to all-white
    app.close()


# 8. Documented values can be set, in YAML and on the command line; loading is quiet.


def test_mixed_precision_no_is_a_string_in_yaml_and_on_the_command_line(tmp_path):
    assert config.load_config(None, ["mixed_precision=no"]).mixed_precision == "no"
    path = tmp_path / "run.yaml"
    path.write_text("mixed_precision: no\ntensorboard: off\n")
    loaded = config.load_config(path)
    assert loaded.mixed_precision == "no" and loaded.tensorboard is False


def _string_keys(cls=config.TrainConfig, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(field.default_factory):
            yield from _string_keys(field.default_factory, prefix + field.name + ".")
        elif hints[field.name] is str:
            yield prefix + field.name


@pytest.mark.parametrize("key", list(_string_keys()))
@pytest.mark.parametrize(
    "spelling", ["no", "off", "yes", "on", "y", "n", "007", "1e-3", "1:30", "0x10", "true"]
)
def test_every_string_key_keeps_yaml_boolean_and_number_spellings(key, spelling):
    for values in (config.parse_override(f"{key}={spelling}"), config.yaml_load(_as_yaml(key, spelling))):
        built = config._build(config.TrainConfig, values)
        section, _, name = key.rpartition(".")
        assert getattr(getattr(built, section) if section else built, name) == spelling


def _as_yaml(key: str, value: str) -> str:
    *sections, name = key.split(".")
    lines = [f"{'  ' * depth}{section}:" for depth, section in enumerate(sections)]
    return "\n".join([*lines, f"{'  ' * len(sections)}{name}: {value}"]) + "\n"


def test_numbers_and_booleans_still_parse_as_yaml_1_2():
    values = config.yaml_load("a: 1e-4\nb: 007\nc: true\nd: [1.0, 3]\ne: .inf\nf: no\n")
    assert values == {"a": 1e-4, "b": 7, "c": True, "d": [1.0, 3], "e": float("inf"), "f": "no"}
    built = config.load_config(
        None, ["train.learning_rate=1e-4", "lora.enabled=no", "diffexp.low_guidance=[1, 2.5]"]
    )
    assert built.train.learning_rate == 1e-4 and built.lora.enabled is False
    assert built.diffexp.low_guidance == [1, 2.5] and type(built.diffexp.low_guidance[0]) is int


def test_loading_a_pipeline_prints_no_deprecation_warning():
    from diffalign import pipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline.load("shapes")
    assert not [w for w in caught if "torch_dtype" in str(w.message)]
