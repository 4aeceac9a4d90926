"""ShapesWorld: rendering, the caption grammar, the train/held-out split and the detector."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from diffalign.shapes import (
    COLOURS,
    HELDOUT_PAIRS,
    PROMPT_SETS,
    SHAPES,
    PromptOutsideGrammar,
    caption,
    correct,
    detect,
    parse,
    prompt_set,
    prompts,
    random_scene,
    render,
    scene_for,
    score,
    score_batch,
    text,
    training_pairs,
)
from diffalign.shapes.accuracy import Degradation, measure
from diffalign.shapes.grammar import holds
from diffalign.shapes.world import GAP, MARGIN, Obj, Scene


def _kinds(objects) -> Counter:
    return Counter((o.colour, o.shape) for o in objects)


# --- world -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_render_is_deterministic_and_anti_aliased(size):
    scene = random_scene(np.random.default_rng(3), n_objects=3)
    image = render(scene, size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert np.array_equal(image, render(scene, size))
    assert np.array_equal(render(random_scene(np.random.default_rng(3), n_objects=3), size), image)
    palette = {tuple(c) for c in COLOURS.values()} | {scene.background}
    blended = [p for p in map(tuple, image.reshape(-1, 3)) if p not in palette]
    assert blended, "edges should blend object and background colours"


def test_random_scenes_keep_objects_inside_and_apart():
    rng = np.random.default_rng(0)
    for _ in range(300):
        objects = random_scene(rng).objects
        assert 1 <= len(objects) <= 3
        for o in objects:
            assert MARGIN - 1e-9 <= o.x - o.size / 2 and o.x + o.size / 2 <= 1 - MARGIN + 1e-9
            assert MARGIN - 1e-9 <= o.y - o.size / 2 and o.y + o.size / 2 <= 1 - MARGIN + 1e-9
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                reach = (a.size + b.size) / 2 + GAP
                assert abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach


# --- grammar -----------------------------------------------------------------------------


def test_every_prompt_parses_and_prints_back_unchanged():
    everything = prompts("train") + prompts("heldout")
    assert len(everything) == len(set(everything))
    for prompt in everything:
        assert text(parse(prompt)) == prompt


def test_parse_tolerates_hand_written_variants():
    left = parse("a red circle left of a blue square")
    assert parse("  A Red circle TO THE LEFT OF a blue square. ") == left
    assert parse("2 green squares") == parse("two green squares")
    assert parse("an yellow triangle") == parse("a yellow triangle")
    right = parse("a blue square right of a red circle")
    assert right != left and right.canonical() == left.canonical() == left


def test_caption_of_a_prompted_scene_states_the_prompt():
    rng = np.random.default_rng(1)
    pool = prompts("train") + prompts("heldout")
    for index in rng.choice(len(pool), 400, replace=False):
        facts = parse(pool[index])
        scene = scene_for(facts, rng)
        assert parse(caption(scene, rng)).canonical() == facts.canonical()
        assert _kinds(scene.objects) == Counter({(e.colour, e.shape): e.count for e in facts.entities})
        for rel in facts.relations:
            subject, obj = scene.objects[rel.subject], scene.objects[rel.object]
            assert holds(rel.relation, (subject.x, subject.y), (obj.x, obj.y))


def test_caption_refuses_scenes_the_grammar_cannot_word():
    mixed = Scene(
        (
            Obj("circle", "red", 0.3, 0.2, 0.2),
            Obj("square", "blue", 0.3, 0.8, 0.2),
            Obj("triangle", "green", 0.3, 0.5, 0.8),
        )
    )
    with pytest.raises(ValueError, match="cannot describe"):
        caption(mixed, np.random.default_rng(0))


@pytest.mark.parametrize(
    "prompt, complaint",
    [
        ("a purpel circle", "did you mean 'purple'"),
        ("a red hexagon", "unknown shape 'hexagon'"),
        ("a red circle near a blue square", "expected '<a|two|three> <colour> <shape>'"),
        ("many red circles", "'many' is not a count"),
        ("two red circles left of a blue square", "relations are between single objects"),
        ("a red circle left of a red circle", "say 'two red circles'"),
        ("", "expected"),
    ],
)
def test_prompts_outside_the_grammar_are_explained(prompt, complaint):
    with pytest.raises(PromptOutsideGrammar) as caught:
        parse(prompt)
    message = str(caught.value)
    assert complaint in message
    assert "a red circle left of a blue square" in message  # shows a valid prompt
    assert isinstance(caught.value, ValueError)


# --- splits ------------------------------------------------------------------------------


def test_splits_partition_the_prompts_and_keep_all_words_in_training():
    for kind in ("single", "count", "relation"):
        train, heldout = prompts("train", kind), prompts("heldout", kind)
        assert train and heldout and not set(train) & set(heldout)
        assert all(not parse(p).pairs & HELDOUT_PAIRS for p in train)
        assert all(parse(p).pairs & HELDOUT_PAIRS for p in heldout)
    assert len(prompts("train", "single")) + len(prompts("heldout", "single")) == len(COLOURS) * len(SHAPES)
    trained = set().union(*(parse(p).pairs for p in prompts("train")))
    assert {c for c, _ in trained} == set(COLOURS) and {s for _, s in trained} == set(SHAPES)
    assert prompts("train") == prompts("train")  # deterministic order


def test_prompt_sets_by_name():
    assert prompt_set("shapes-train") == prompts("train", "all")
    assert prompt_set("shapes-heldout") == prompts("heldout", "all")
    for kind in ("single", "count", "relation"):
        name = f"shapes-{kind}"
        assert prompt_set(name) == prompts("train", kind)
        assert {parse(p).kind for p in prompt_set(name)} == {kind}
    assert set(PROMPT_SETS) == {f"shapes-{n}" for n in ("train", "heldout", "single", "count", "relation")}
    with pytest.raises(ValueError, match="Did you mean 'shapes-count'"):
        prompt_set("shapes-counts")


def test_training_pairs_never_show_heldout_compositions_and_mix_kinds():
    pairs = list(training_pairs(2000, np.random.default_rng(0), size=32))
    kinds = Counter()
    for image, prompt in pairs:
        facts = parse(prompt)
        assert not facts.pairs & HELDOUT_PAIRS, prompt
        kinds[facts.kind] += 1
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert abs(kinds["single"] / 2000 - 0.4) < 0.05
    assert abs(kinds["count"] / 2000 - 0.2) < 0.05
    assert abs(kinds["relation"] / 2000 - 0.4) < 0.05
    again = list(training_pairs(5, np.random.default_rng(0), size=64))
    assert [p for _, p in again] == [p for _, p in pairs[:5]]  # same seed, same data, any size
    assert again[0][0].shape == (64, 64, 3)


# --- detector ----------------------------------------------------------------------------


@pytest.mark.parametrize("size, n", [(32, 1000), (64, 200)])
def test_detector_recovers_random_scenes_exactly(size, n):
    rng = np.random.default_rng(size)
    exact = 0
    for _ in range(n):
        scene = random_scene(rng)
        found = detect(render(scene, size))
        exact += _kinds(found) == _kinds(scene.objects)
        if len(scene.objects) == len(found) == 1:
            (o,), (d,) = scene.objects, found
            assert abs(d.x - o.x) < 0.02 and abs(d.y - o.y) < 0.02
    assert exact / n >= 0.99


def test_detector_survives_generator_like_damage():
    """Blur σ = 1 px, washed-out colours and pixel noise, as a tiny diffusion model makes."""
    figures = measure(n=150, seed=0, size=32, damage=Degradation(blur=1.0, saturation=0.6, noise=0.03))
    assert figures.exact_scenes >= 0.95
    assert min(figures.score_one.values()) >= 0.95


def test_score_is_one_exactly_when_the_prompt_holds():
    rng = np.random.default_rng(2)
    pool = prompts("train") + prompts("heldout")
    for index in rng.choice(len(pool), 300, replace=False):
        image = render(scene_for(pool[index], rng))
        assert score(image, pool[index]) == 1.0
        assert correct(image, pool[index])


def test_score_gives_documented_partial_credit_for_mismatches():
    rng = np.random.default_rng(4)
    image = render(scene_for("a red circle left of a blue square", rng))
    assert score(image, "a red circle right of a blue square") == pytest.approx(2 / 3)  # relation wrong
    assert score(image, "a blue square right of a red circle") == 1.0  # same meaning
    assert score(image, "a blue circle left of a red square") == 0.0  # colours swapped: 0 of 3, 2 extra
    assert score(image, "a red circle") == pytest.approx(1 / 2)  # the square is unrequested
    assert score(image, "a red triangle left of a blue square") == pytest.approx(1 / 4)
    assert not correct(image, "a red circle right of a blue square")

    two = render(scene_for("two green squares", rng))
    assert score(two, "two green squares") == 1.0
    assert score(two, "three green squares") == pytest.approx(2 / 3)
    assert score(two, "a green square") == pytest.approx(1 / 2)
    assert score(two, "two green circles") == 0.0


def test_score_batch_matches_score():
    rng = np.random.default_rng(5)
    batch_prompts = [
        "a cyan triangle",
        "two purple circles",
        "a yellow circle above a red square",
        "a red circle",
    ]
    images = [render(scene_for(p, rng)) for p in batch_prompts[:3]] + [np.zeros((32, 32, 3), np.uint8)]
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255  # [B, 3, H, W]
    scores = score_batch(tensor, batch_prompts)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert scores.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert scores.tolist() == [score(i, p) for i, p in zip(images, batch_prompts)]
    with pytest.raises(ValueError, match="one prompt per image"):
        score_batch(tensor, batch_prompts[:2])


def test_malformed_images_get_partial_credit_never_a_crash():
    rng = np.random.default_rng(6)
    prompt = "a red circle left of a blue square"
    clean = render(scene_for(prompt, rng))
    blurred = np.asarray(Image.fromarray(clean).filter(ImageFilter.GaussianBlur(4)))
    cases = {
        "black": np.zeros((32, 32, 3), np.uint8),
        "uniform noise": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
        "heavy blur": blurred,
        "one giant blob": np.tile(np.array(COLOURS["red"], np.uint8), (32, 32, 1)),
        "NaN": np.full((3, 32, 32), np.nan, np.float32),
        "half NaN": np.where(rng.random((32, 32, 3)) < 0.5, np.nan, clean / 255.0),
    }
    for name, image in cases.items():
        value = score(image, prompt)
        assert 0.0 <= value < 1.0 and np.isfinite(value), name
    assert detect(cases["black"]) == [] and score(cases["black"], prompt) == 0.0
    assert detect(cases["uniform noise"]) == []
    (blob,) = detect(cases["one giant blob"])
    assert blob.shape == "unknown" and score(cases["one giant blob"], "a red square") == 0.0
    assert 0.0 < score(blurred, prompt)  # the colours are still there: partial credit
    noisy = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(score_batch(noisy, [prompt] * 3)).all()


def test_tinted_and_lighter_backgrounds_do_not_fool_the_detector():
    rng = np.random.default_rng(7)
    for background in [(60, 50, 40), (30, 38, 46), (90, 90, 90)]:
        for _ in range(40):
            scene = dataclasses.replace(random_scene(rng), background=background)
            assert _kinds(detect(render(scene))) == _kinds(scene.objects), background
