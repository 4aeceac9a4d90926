"""The pieces several parts share, written once: the pipeline loader path, atomic writes, PSNR."""

import math
import os

import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

from diffalign import images, outputs, pipeline
from diffalign.inpainting import load_inpainting


def test_one_loader_path_serves_text_to_image_and_inpainting():
    assert {"tiny-random", "tiny-random-inpaint", "shapes", "shapes-inpaint"} <= set(pipeline.builtin_names())
    assert set(pipeline.builtin_names("inpainting")) >= {"tiny-random-inpaint", "shapes-inpaint"}
    assert "tiny-random" not in pipeline.builtin_names("inpainting")
    assert isinstance(pipeline.load("tiny-random"), StableDiffusionPipeline)
    assert isinstance(pipeline.load("tiny-random-inpaint"), StableDiffusionInpaintPipeline)
    # A text-to-image name is not an inpainting model: the same typo check, among inpainting names.
    with pytest.raises(pipeline.PipelineError, match="Did you mean 'tiny-random-inpaint'"):
        load_inpainting("tiny-random")
    for load in (pipeline.load, load_inpainting):  # one rule for "is this a path"
        with pytest.raises(pipeline.PipelineError, match="does not exist"):
            load("./no/such/folder")


def test_atomic_writes_leave_normal_permissions_and_no_temporaries(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    written = outputs.write_text(tmp_path / "a.json", "{}")
    assert written.read_text() == "{}" and (written.stat().st_mode & 0o777) == 0o666 & ~umask
    with outputs.staging_folder(tmp_path / "set") as staging:
        (staging / "x.txt").write_text("x")
    assert (tmp_path / "set" / "x.txt").read_text() == "x"
    assert ((tmp_path / "set").stat().st_mode & 0o777) == 0o777 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "set"]


def test_a_staging_folder_that_must_not_replace_keeps_what_another_process_wrote(tmp_path):
    final = tmp_path / "data"
    with pytest.raises(FileExistsError), outputs.staging_folder(final, replace=False) as staging:
        (staging / "mine.txt").write_text("mine")
        final.mkdir()
        (final / "theirs.txt").write_text("theirs")  # finished first
    assert sorted(p.name for p in final.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the staging folder is gone


def test_psnr_of_a_pair_and_of_a_batch():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.full((2, 3, 4, 4), 0.1)
    assert images.psnr(a[0], b[0]) == pytest.approx(20.0)  # 10·log10(1/0.01)
    b[1] = 0.01
    assert images.psnr(a, b) == pytest.approx(30.0)  # per image (20, 40), then the mean
    assert images.psnr(a[0], a[0]) == math.inf
    assert images.psnr(a, a, max_db=100.0) == 100.0
