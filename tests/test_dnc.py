"""Detect-and-Compare (MuDI): the score on hand-computed matrices, the OWLv2 + DINOv2 scorer on tiny
random models, its missing-checkpoint error, and ``diffalign bench dnc``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffalign.rewards.checkpoints import MissingCheckpointError
from PIL import Image

from diffalign import dnc, registry
from diffalign.cli import main
from diffalign.subjects import Subject, SubjectImages

S_REF = torch.tensor([[0.9, 0.3], [0.3, 0.8]])


# --- the score -----------------------------------------------------------------------------------


def test_faithful_detections_score_one_in_any_order():
    assert dnc.dnc_score(S_REF, S_REF) == pytest.approx(1.0)
    assert dnc.dnc_score(S_REF[[1, 0]], S_REF) == pytest.approx(1.0)  # the detector's order is irrelevant


def test_a_subject_drawn_twice_leaves_one_row_wrong():
    twice = torch.tensor([[0.9, 0.3], [0.9, 0.3]])
    # subject B's row is [0.9, 0.3] instead of [0.3, 0.8]: ‖·‖_F = sqrt(0.6² + 0.5²)
    assert dnc.dnc_score(twice, S_REF) == pytest.approx(1 - math.sqrt(0.61))
    assert dnc.dnc_score(twice, S_REF, per_entry=True) == pytest.approx(1 - math.sqrt(0.61) / 2)
    assert not dnc.all_subjects_present(twice)


def test_a_blended_detection_lowers_the_score_but_counts_as_present():
    blended = torch.tensor([[0.9, 0.3], [0.55, 0.6]])
    assert dnc.dnc_score(blended, S_REF) == pytest.approx(1 - math.sqrt(0.25**2 + 0.2**2))
    assert dnc.all_subjects_present(blended)


def test_a_wrong_count_scores_zero():
    assert dnc.dnc_score(S_REF[:1], S_REF) == 0.0  # a subject is missing
    assert dnc.dnc_score(torch.cat([S_REF, S_REF[:1]]), S_REF) == 0.0  # one too many
    assert dnc.dnc_score(torch.empty(0, 2), S_REF) == 0.0
    assert not dnc.all_subjects_present(S_REF[:1])


def test_a_distance_beyond_one_is_clipped_to_zero():
    assert dnc.dnc_score(torch.tensor([[-1.0, 1.0], [1.0, -1.0]]), S_REF) == 0.0


def test_matching_maximises_the_total_similarity_not_subject_by_subject():
    # Greedy in subject order would give subject A detection 0 (0.9) and B detection 1 (0.1): 1.0 in all;
    # the assignment gives A detection 1 and B detection 0: 0.8 + 0.85.
    assert dnc.match_detections(torch.tensor([[0.9, 0.85], [0.8, 0.1]])) == [1, 0]


def test_matrices_of_the_wrong_shape_are_refused():
    with pytest.raises(dnc.DnCError, match=r"\[D, N\]"):
        dnc.dnc_score(torch.zeros(2, 3), S_REF)
    with pytest.raises(dnc.DnCError, match="square"):
        dnc.dnc_score(torch.zeros(2, 2), torch.zeros(2, 3))


def test_similarity_matrices_from_embeddings():
    e1, e2 = torch.eye(2)
    diagonal = (e1 + e2) / math.sqrt(2)
    references = [torch.stack([e1, diagonal]), e2[None]]
    s_ref = dnc.reference_similarity(references)
    # distinct pairs only on the diagonal; a single reference is 1
    expected = [[1 / math.sqrt(2), 0.5 / math.sqrt(2)], [0.5 / math.sqrt(2), 1.0]]
    assert torch.allclose(s_ref, torch.tensor(expected, dtype=torch.float64))
    s_det = dnc.detection_similarity(torch.stack([e2, e1]), references)
    assert torch.allclose(
        s_det, torch.tensor([[0.5 / math.sqrt(2), 1.0], [0.5 + 0.5 / math.sqrt(2), 0.0]]).double()
    )
    assert dnc.detection_similarity(torch.empty(0, 2), references).shape == (0, 2)


def test_summary_reports_mixing_only_when_the_scorer_tells():
    results = [dnc.DnCResult(0.8, 2, True, None), dnc.DnCResult(0.0, 1, False, None)]
    assert dnc.summarise(results) == {"images": 2, "mean_dnc": 0.4, "all_present": 0.5, "mixing_rate": None}
    told = [dnc.DnCResult(0.8, 2, True, False), dnc.DnCResult(0.5, 2, True, True)]
    assert dnc.summarise(told)["mixing_rate"] == 0.5


# --- the real scorer on tiny random OWLv2 / DINOv2 ---------------------------------------------------


def _random_image(generator: torch.Generator, width: int = 32, height: int = 32) -> Image.Image:
    return Image.fromarray((torch.rand(height, width, 3, generator=generator) * 255).byte().numpy())


def _subjects(generator: torch.Generator, references: int = 2) -> list[SubjectImages]:
    return [
        SubjectImages(
            Subject(identifier, word, Path(identifier)), [_random_image(generator) for _ in range(references)]
        )
        for identifier, word in (("olis", "toy"), ("hta", "dog"))
    ]


@pytest.fixture(scope="module")
def scorer():
    return dnc.build("owlv2-dinov2", checkpoint="tiny-random")


def test_the_scorer_is_registered_by_name():
    assert "owlv2-dinov2" in registry.DNC_SCORERS.names()
    with pytest.raises(dnc.DnCError, match="Did you mean 'owlv2-dinov2'"):
        dnc.build("owlv2-dino")


def test_scores_are_one_per_image_and_deterministic(scorer):
    generator = torch.Generator().manual_seed(0)
    subjects, images = _subjects(generator), torch.rand(3, 3, 48, 64, generator=generator)
    first = scorer(images, subjects)
    assert len(first) == 3 and all(0.0 <= result.dnc <= 1.0 and result.mixed is None for result in first)
    rebuilt = dnc.OwlDinoDnC(checkpoint="tiny-random")  # a second seeded build: the same models
    assert rebuilt(images, subjects) == first
    boxes = scorer.detect(images, ["toy", "dog"])
    assert [b.shape[1] for b in boxes] == [4, 4, 4]


def test_the_detection_threshold_sets_the_count_and_the_score(scorer):
    generator = torch.Generator().manual_seed(1)
    subjects, images = _subjects(generator), torch.rand(1, 3, 32, 32, generator=generator)
    saved = scorer.threshold, scorer.nms_iou
    try:
        scorer.nms_iou = 1.0  # every box counts, so the count falls monotonically with the threshold
        scorer.threshold = 1.0
        [nothing] = scorer(images, subjects)
        assert (nothing.detections, nothing.dnc, nothing.all_present) == (0, 0.0, False)
        scorer.threshold = 0.0
        [everything] = scorer(images, subjects)
        assert everything.detections == 16 and everything.dnc == 0.0  # one box per patch of 4 x 4
        low, high = 0.0, 1.0  # the threshold that keeps exactly the two best boxes
        for _ in range(40):
            scorer.threshold = (low + high) / 2
            count = scorer.detect(images, ["toy", "dog"])[0].shape[0]
            if count == 2:
                break
            low, high = (scorer.threshold, high) if count > 2 else (low, scorer.threshold)
        [two] = scorer(images, subjects)
        assert two.detections == 2 and two.dnc > 0.0
    finally:
        scorer.threshold, scorer.nms_iou = saved


def test_crops_that_are_the_references_score_one(scorer):
    generator = torch.Generator().manual_seed(2)
    first, second = _random_image(generator), _random_image(generator)
    subjects = [
        SubjectImages(Subject("olis", "toy", Path("a")), [first]),
        SubjectImages(Subject("hta", "dog", Path("b")), [second]),
    ]
    side_by_side = np.concatenate([np.asarray(first), np.asarray(second)], axis=1)  # [32, 64, 3]
    image = torch.from_numpy(side_by_side).permute(2, 0, 1).float()[None] / 255
    both = torch.tensor([[32.0, 0.0, 64.0, 32.0], [0.0, 0.0, 32.0, 32.0]])
    [faithful] = scorer.compare(image, [both], subjects)
    assert faithful.dnc == pytest.approx(1.0, abs=1e-5) and faithful.all_present
    [twice] = scorer.compare(image, [torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2)], subjects)
    assert twice.dnc < 0.999 and not twice.all_present


def test_missing_models_are_named_with_how_to_get_them(tmp_path):
    with pytest.raises(MissingCheckpointError) as caught:
        dnc.OwlDinoDnC(detector=str(tmp_path / "owl"), embedder=str(tmp_path / "dino"))
    message = str(caught.value)
    for expected in (
        "detector",
        "embedder",
        dnc.OWL_ID,
        dnc.DINO_ID,
        "hf download",
        "checkpoint=tiny-random",
    ):
        assert expected in message
    with pytest.raises(dnc.DnCError, match="checkpoint takes only"):
        dnc.OwlDinoDnC(checkpoint="google/owlv2-base-patch16")


# --- the command ---------------------------------------------------------------------------------------


def test_bench_dnc_writes_its_outputs_and_refuses_to_overwrite(tmp_path, capsys):
    generator = torch.Generator().manual_seed(3)
    folders = {}
    for name in ("toy", "dog"):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        _random_image(generator).save(folders[name] / "0.png")
        Image.new("L", (32, 32), 255).save(folders[name] / "0.mask.png")  # a mask, not a reference
    generated = tmp_path / "generated"
    generated.mkdir()
    for index in range(3):
        _random_image(generator, width=48).save(generated / f"{index}.png")
    out = tmp_path / "out"
    command = [
        "bench", "dnc", str(generated),
        "--subject", "olis", "toy", str(folders["toy"]),
        "--subject", "hta", "dog", str(folders["dog"]),
        "--scorer", "owlv2-dinov2", "--option", "checkpoint=tiny-random", "--option", "threshold=0.0",
        "-o", str(out),
    ]  # fmt: skip
    assert main(command) == 0
    assert "D&C (owlv2-dinov2) over 3 images" in capsys.readouterr().out
    report = json.loads((out / "dnc.json").read_text())
    assert [row["image"] for row in report["images"]] == ["0.png", "1.png", "2.png"]
    assert [s["references"] for s in report["subjects"]] == [1, 1]  # masks were not read as references
    assert report["summary"]["images"] == 3 and report["summary"]["mixing_rate"] is None
    assert report["settings"]["options"] == {"checkpoint": "tiny-random", "threshold": 0.0}
    lines = (out / "dnc.csv").read_text().splitlines()
    assert lines[0] == "image,dnc,detections,all_present,mixed" and len(lines) == 4
    before = (out / "dnc.json").read_text()
    assert main(command) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "dnc.json").read_text() == before
    assert main([*command, "--overwrite"]) == 0
