"""ShapesWorld identities (MuDI subjects): catalogue, rendering, subject folders, the exact identity
detector and the ``shapes-exact`` D&C scorer."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign import registry
from diffalign.shapes import identities as I
from diffalign.shapes.dnc import ShapesDnC
from diffalign.shapes.world import Obj, Scene, render
from diffalign.subjects import SubjectError, SubjectImages
from diffalign.tokenizer import clip_tokenizer

IDS = list(I.CATALOGUE.values())
GRAMMAR_WORDS = {"a", "an", "one", "two", "three", "left", "right", "of", "above", "below", "photo", "and"}


def _image(looks, seed=0, size=32):
    return I.render_identities(I.place_identities(looks, np.random.default_rng(seed)), size)


def _tensor(*images) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def _subjects(identities, tmp_path):
    return [
        SubjectImages(I.write_subject_folder(i, tmp_path / i.name, images=2, seed=k), [], [])
        for k, i in enumerate(identities)
    ]


def test_catalogue_is_distinct_and_identifiers_are_single_rare_tokens():
    assert len(IDS) == 8
    assert len({i.traits for i in IDS}) == len({i.identifier for i in IDS}) == len(IDS)
    tokenizer = clip_tokenizer()
    for ident in IDS:
        assert len(tokenizer.tokenize(ident.identifier)) == 1, ident.identifier
        assert ident.identifier not in GRAMMAR_WORDS | set(I.COLOURS) | set(I.SHAPES)
        assert ident.class_word == ident.shape and ident.token == f"{ident.identifier} {ident.shape}"


def test_pairs_are_similar_or_dissimilar_as_named():
    for name in I.SUBJECT_PAIRS:
        a, b = I.pair(name)
        same = [x == y for x, y in zip(a.traits.slots(), b.traits.slots())]
        assert same == ([True, True, False, False] if name.startswith("similar") else [False] * 4), name
        assert a.marking_colour != b.colour and b.marking_colour != a.colour, "a mix would be invisible"
    with pytest.raises(I.UnknownIdentity, match="similar-1"):
        I.pair("similar-9")


def test_prompts_name_each_subject_once():
    a, b = I.pair("similar-1")
    prompts = I.pair_prompts("similar-1")
    assert prompts[0] == f"a photo of {a.token} and {b.token}"
    assert all(p.count(a.identifier) == 1 and p.count(b.identifier) == 1 for p in prompts)
    assert len(set(prompts)) == len(prompts)


def test_plain_looks_render_as_the_world_does():
    obj = Obj("triangle", "blue", 0.33, 0.4, 0.6)
    placed = [I.Placed(I.Traits("triangle", "blue"), obj.size, obj.x, obj.y)]
    assert np.array_equal(I.render_identities(placed), render(Scene((obj,))))


@pytest.mark.parametrize("ident", IDS, ids=lambda i: i.name)
def test_detector_reads_each_identity_exactly(ident):
    for seed in range(3):
        (found,) = I.detect_identities(_image([ident], seed), IDS)
        assert (found.identity, found.mixed, found.traits) == (ident.name, False, ident.traits)


@pytest.mark.parametrize("name", list(I.SUBJECT_PAIRS))
def test_detector_reads_pairs_and_flags_mixed_objects(name):
    a, b = I.pair(name)
    found = I.detect_identities(_image([a, b], seed=3), [a, b])
    assert sorted(d.identity for d in found) == sorted([a.name, b.name])
    assert not any(d.mixed for d in found)
    take = ("marking_colour",) if name.startswith("similar") else ("marking", "marking_colour")
    for body, other in ((a, b), (b, a)):
        (mixed,) = I.detect_identities(_image([I.mix(body, other, take)], seed=4), [a, b])
        assert mixed.identity is None and mixed.mixed, (body.name, mixed.traits)


def test_plain_and_foreign_objects_are_neither_identity_nor_mixed():
    a, b = I.pair("similar-1")
    (plain,) = I.detect_identities(_image([I.Traits(a.shape, a.colour)]), [a, b])
    assert (plain.identity, plain.mixed, plain.marking) == (None, False, None)
    (other,) = I.detect_identities(_image([I.CATALOGUE[I.SUBJECT_PAIRS["similar-2"][0]]]), [a, b])
    assert (other.identity, other.mixed) == (None, False)


def test_detector_exact_on_random_clean_scenes_and_robust_when_degraded():
    assert I.measure_accuracy(40, seed=5) == 1.0
    assert I.measure_accuracy(30, seed=6, blur=1.0, noise=0.04) >= 0.9


def test_detector_survives_blank_and_noise():
    assert I.read_objects(np.zeros((32, 32, 3))) == []
    assert I.read_objects(np.full((32, 32, 3), np.nan)) == []
    noise = np.random.default_rng(0).uniform(0, 1, (32, 32, 3))
    assert all(d.identity is None for d in I.detect_identities(noise, IDS))


def test_dnc_is_the_papers_score_of_the_exact_matrices(tmp_path):
    a, b = I.pair("similar-1")
    subjects = _subjects([a, b], tmp_path)
    scorer = ShapesDnC()
    results = scorer(
        _tensor(_image([a, b], 1), _image([a], 2), _image([a, a], 3), _image([a, b, b], 4)), subjects
    )
    # A similar pair: S_ref = [[1, .5], [.5, 1]]; a twice puts [1, .5] where [.5, 1] should be.
    assert [r.dnc for r in results] == pytest.approx([1.0, 0.0, 1 - math.sqrt(0.5), 0.0])
    assert [r.all_present for r in results] == [True, False, False, False]
    assert [r.detections for r in results] == [2, 1, 2, 3]
    assert not any(r.mixed for r in results)


@pytest.mark.parametrize("name", ["similar-2", "dissimilar-1"])
def test_dnc_is_lower_for_a_mixed_object(name, tmp_path):
    a, b = I.pair(name)
    take = ("marking_colour",) if name.startswith("similar") else ("marking", "marking_colour")
    images = _tensor(_image([a, b], 1), _image([a, I.mix(b, a, take)], 2))
    good, mixed = ShapesDnC()(images, _subjects([a, b], tmp_path))
    assert good.dnc == 1.0 and not good.mixed
    # The mixed object agrees on 3 of 4 traits with each subject (similar) or 2 of 4 (dissimilar).
    expected = 1 - math.sqrt(2 * 0.25**2) if name.startswith("similar") else 1 - math.sqrt(0.5)
    assert mixed.dnc == pytest.approx(expected) and mixed.mixed and not mixed.all_present


def test_dnc_reads_uncatalogued_subjects_from_their_references(tmp_path):
    look = I.Identity("mine", "vux", "square", "cyan", "dot", "purple")
    subject = I.write_subject_folder(look, tmp_path / "mine", images=3)
    item = SubjectImages(subject, [Image.open(p) for p in sorted(subject.folder.glob("??.png"))], [])
    (result,) = ShapesDnC()(_tensor(_image([look], 7)), [item])
    assert result.dnc == 1.0 and result.all_present
    wrong = SubjectImages(dataclasses.replace(subject, class_word="circle"), item.images, [])
    with pytest.raises(SubjectError, match="not a circle"):
        ShapesDnC()(_tensor(_image([look], 7)), [wrong])


def test_subject_folder_round_trip_and_determinism(tmp_path):
    ident = IDS[2]
    subject = I.write_subject_folder(ident, tmp_path / "a", images=4, seed=3)
    assert (subject.identifier, subject.class_word, subject.folder) == (
        ident.identifier,
        ident.shape,
        tmp_path / "a",
    )
    names = sorted(p.name for p in subject.folder.iterdir())
    assert names == [f"{i:02d}{ext}" for i in range(4) for ext in (".mask.png", ".png")]
    for i in range(4):
        image = np.asarray(Image.open(subject.folder / f"{i:02d}.png"))
        mask = Image.open(subject.folder / f"{i:02d}.mask.png")
        assert mask.mode == "L" and mask.size == (32, 32) and image.shape == (32, 32, 3)
        (found,) = I.detect_identities(image, [ident])
        assert found.identity == ident.name
        # The mask covers the object: the pixels far from the background are exactly the mask's inside.
        lifted = np.linalg.norm(image / 255 - np.array(I.BACKGROUND) / 255, axis=-1) > 0.3
        inside = np.asarray(mask) >= 128
        assert (lifted & ~inside).sum() <= 2 and (inside & ~lifted).sum() <= 2
    again = I.write_subject_folder(ident, tmp_path / "b", images=4, seed=3)
    other = I.write_subject_folder(ident, tmp_path / "c", images=4, seed=4)
    read = lambda folder: [np.asarray(Image.open(folder / f"{i:02d}.png")) for i in range(4)]
    assert all(np.array_equal(x, y) for x, y in zip(read(subject.folder), read(again.folder)))
    assert not all(np.array_equal(x, y) for x, y in zip(read(subject.folder), read(other.folder)))
    with pytest.raises(FileExistsError, match="empty folder"):
        I.write_subject_folder(ident, tmp_path / "a")


def test_pair_folders_and_registered_scorer(tmp_path):
    subjects = I.write_pair_folders("dissimilar-2", tmp_path, images=2)
    assert [s.folder.name for s in subjects] == [i.name for i in I.pair("dissimilar-2")]
    entry = registry.DNC_SCORERS.get("shapes-exact")
    assert entry is not None and entry.world == "ShapesWorld"
    assert entry.make().name == "shapes-exact"


def test_every_subject_pair_is_a_subject_set(tmp_path):
    from diffalign.shapes import SUBJECT_PAIR_NAMES

    assert (
        tuple(I.SUBJECT_PAIRS) == SUBJECT_PAIR_NAMES
    )  # the registration's copy of the names has not drifted
    made = registry.SUBJECT_SETS.get("shapes-similar-2").make_folders(tmp_path)
    expected = [(i.identifier, i.class_word) for i in I.pair("similar-2")]
    assert [(ident, cls) for ident, cls, _ in made] == expected
    assert all(folder.parent == tmp_path for _, _, folder in made)
