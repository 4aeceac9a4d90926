"""The hard-negative ShapesWorld CLIP (shapes-negclip): its negatives are false by the exact
detector, it reads the word order the shipped CLIP ignores, and its recipe runs end to end."""

import json

import numpy as np
import pytest
import torch

from diffalign import rewards
from diffalign.cli import main
from diffalign.shapes import detector, negclip
from diffalign.shapes.grammar import parse
from diffalign.shapes.splits import HELDOUT_PAIRS, training_pairs


def scenes(n: int, seed: int):
    return list(training_pairs(n, np.random.default_rng(seed), 32))


def test_every_hard_negative_is_false_of_its_scene_and_stays_in_the_train_split():
    rng = np.random.default_rng(0)
    checked = {"relation": 0, "count": 0}
    for image, caption in scenes(400, 3):
        negative = negclip.hard_negatives(caption, rng)
        kind = parse(caption).kind
        if kind == "single":
            assert negative is None
            continue
        checked[kind] += 1
        assert negative != caption
        assert detector.score(image, caption) == 1.0  # the scene is what its caption says ...
        assert detector.score(image, negative) < 1.0  # ... and the exact detector rejects the negative
        assert not parse(negative).pairs & HELDOUT_PAIRS
    assert checked["relation"] > 100 and checked["count"] > 40


def pairwise(reward, kind: str, n: int = 600) -> float:
    """How often a fresh scene's caption outscores its hard negative under ``reward``."""
    rng = np.random.default_rng(1)
    rows = [
        (image, caption, negclip.hard_negatives(caption, rng))
        for image, caption in scenes(n, 11)
        if parse(caption).kind == kind
    ]
    images = torch.from_numpy(np.stack([r[0] for r in rows])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        true = reward(images, [r[1] for r in rows])
        false = reward(images, [r[2] for r in rows])
    return (true > false).float().mean().item()


def test_the_shipped_negclip_reads_relations_that_shapes_clip_cannot():
    clip, negative = rewards.build("shapes-clip"), rewards.build("shapes-negclip")
    assert negative.differentiable and negative.name == "shapes-negclip"
    assert abs(pairwise(clip, "relation") - 0.5) < 0.1  # a bag of words
    assert pairwise(negative, "relation") > 0.85
    assert pairwise(negative, "count") > 0.9


def test_train_negclip_runs_and_reports_before_and_after(tmp_path, capsys):
    out = tmp_path / "negclip"
    args = [
        "shapes",
        "train-negclip",
        "--output",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "16",
        "--dataset-size",
        "64",
        "--eval-scenes",
        "64",
        "--warmup-steps",
        "1",
        "--fp32",
    ]
    assert main(args) == 0
    report = json.loads((out / "training_report.json").read_text())
    assert set(report["before"]) == {"relation_pairwise", "count_pairwise", "retrieval_top1_of_64"}
    assert len(report["losses"]) == 3 and all(np.isfinite(report["losses"]))
    reward = rewards.build("shapes-negclip", checkpoint=str(out / "clip"))
    assert reward(torch.rand(2, 3, 32, 32), ["a red circle", "two blue squares"]).shape == (2,)
    assert "relation_pairwise" in capsys.readouterr().out
    # A second run into the same folder is refused and leaves the first intact.
    before = (out / "training_report.json").read_bytes()
    assert main(args) == 2
    assert (out / "training_report.json").read_bytes() == before


def test_negclip_loss_counts_a_negative_equal_to_another_caption_as_its_positive():
    """Targets by string equality: the negative 'a red circle right of a blue square' of one image
    is the true caption of another, and is that image's positive."""
    model, tokenizer = negclip.assets.load_clip()
    captions = ["a red circle left of a blue square", "a red circle right of a blue square"]
    texts = captions + ["a red circle right of a blue square", "a red circle left of a blue square"]
    ids = negclip.tokenize(tokenizer, texts)
    pixels = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        loss = negclip.negclip_loss(model, ids, pixels, texts, captions)
        logits = model(input_ids=ids, pixel_values=pixels).logits_per_image
    same = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.float32) / 2
    expected_i2t = torch.nn.functional.cross_entropy(logits, same)
    expected_t2i = torch.nn.functional.cross_entropy(logits[:, :2].T, torch.eye(2))
    assert loss.item() == pytest.approx(((expected_i2t + expected_t2i) / 2).item(), rel=1e-6)
