"""TIA2 (Kim et al. 2024) and shapes-TIA: metrics against independent hand computations on a
tiny hand-made dataset, the score cache, bad input, and the generated default set."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffalign.benchmarks import shapes_tia, tia2
from diffalign.rewards import RewardInfo, base
from PIL import Image

from diffalign import images
from diffalign.cli import main

# The toy benchmark: the reward is an image's mean brightness, so each image's score is the
# grey level it was written with. (key, caption, grey level / 255, human labels)
PROMPT_A = [  # six images, scores strictly decreasing; ground truth 1, 0, 1, -1, 1, -1
    ("a0.png", "prompt a", 230, [1, 1, 1]),
    ("a1.png", "prompt a", 204, [1, 0, -1]),  # no majority: median 0
    ("a2.png", "prompt a", 178, [1, 1, 0]),
    ("a3.png", "prompt a", 153, [-1, -1, 0]),
    ("a4.png", "prompt a", 128, [1, 1, -1]),
    ("a5.png", "prompt a", 102, [0, -1, -1]),
]
PROMPT_B = [  # every image aligned: nothing to rank, skipped
    ("b0.png", "prompt b", 80, [1, 1, 0]),
    ("b1.png", "prompt b", 60, [1, 1, 1]),
]
PROMPT_C = [  # unsure above misaligned, no aligned image: correlations only
    ("c0.png", "prompt c", 50, [0, 0, 1]),
    ("c1.png", "prompt c", 40, [-1, -1, -1]),
]
MISSING = ("a6.png", "prompt a", None, [1, 1, 1])  # labelled, never written


class Brightness(torch.nn.Module):
    """Mean pixel value; counts the images it is asked to score."""

    differentiable = False

    def __init__(self, name: str = "tia2-test-brightness", sign: float = 1.0, scale: float = 1.0):
        super().__init__()
        self.name, self.sign, self.scale, self.calls, self.images = name, sign * scale, scale, 0, 0

    def forward(self, pixels: torch.Tensor, prompts) -> torch.Tensor:
        self.calls += 1
        self.images += len(pixels)
        return self.sign * pixels.mean(dim=(1, 2, 3))


def write_tia2(folder: Path, rows, subset: str = "counting") -> Path:
    """A TIA2-format folder: ``<subset>.json`` and 4×4 grey PNGs in ``<subset>/``."""
    (folder / subset).mkdir(parents=True, exist_ok=True)
    entries = {}
    for key, caption, grey, labels in rows:
        if grey is not None:
            Image.new("RGB", (4, 4), (grey, grey, grey)).save(folder / subset / key)
        entries[key] = {"caption": caption, "human_labels": labels}
    (folder / f"{subset}.json").write_text(json.dumps(entries), "utf-8")
    return folder


@pytest.fixture()
def toy(tmp_path) -> Path:
    folder = write_tia2(tmp_path / "toy", [*PROMPT_A, MISSING, *PROMPT_B, *PROMPT_C])
    # The same name in the shared images/ folder must lose to the subset's own folder.
    (folder / "images").mkdir()
    Image.new("RGB", (4, 4), (0, 0, 0)).save(folder / "images" / "a0.png")
    return folder


def brute_force_auroc(scores, positive) -> float:
    pairs = [(s, t) for s, p in zip(scores, positive) if p for t, q in zip(scores, positive) if not q]
    return sum(1.0 if s > t else 0.5 if s == t else 0.0 for s, t in pairs) / len(pairs)


def average_precision_by_definition(scores, positive) -> float:
    """Mean over the aligned images of the precision among the images ranked at or above each."""
    ranked = [p for _, p in sorted(zip(scores, positive), key=lambda pair: -pair[0])]
    hits = np.cumsum(ranked)
    return float(np.mean([hits[i] / (i + 1) for i, p in enumerate(ranked) if p]))


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ((1, 1, 0), 1),
        ((-1, -1, 1), -1),
        ((1, 0, -1), 0),
        ((1, 0), 0),
        ((0, -1), 0),
        ((1,), 1),
        ((1, 1, -1, -1), 0),
    ],
)
def test_ground_truth_is_the_majority_else_the_median_rounded_to_unsure(labels, expected):
    assert tia2.ground_truth(labels) == expected


def test_metrics_match_independent_computations_and_count_skips(toy):
    with pytest.warns(UserWarning, match=r"1 of 11 labelled images not found \(e.g. a6.png\)"):
        dataset = tia2.load(toy)
    reward = Brightness()
    summary = tia2.evaluate(reward, dataset, progress=False)["counting"]

    scores = [grey / 255 for _, _, grey, _ in PROMPT_A]
    aligned = [tia2.ground_truth(labels) == 1 for *_, labels in PROMPT_A]
    assert aligned == [True, False, True, False, True, False]
    auroc = brute_force_auroc(scores, aligned)
    assert auroc == pytest.approx(6 / 9)  # a0 beats 3 misaligned, a2 beats 2, a4 beats 1
    # Prompt C has no aligned image, so the ranking metrics are prompt A's alone.
    assert summary["auroc"] == pytest.approx(auroc)
    assert summary["auprc"] == pytest.approx(average_precision_by_definition(scores, aligned))
    assert summary["auprc"] == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3)
    assert summary["p@5"] == pytest.approx(3 / 5)  # a0..a4 hold three aligned images
    assert summary["p@10"] == summary["p@25"] == pytest.approx(3 / 6)  # fewer than k images: all six
    # Prompt A by hand. Spearman: score ranks 6..1 against label ranks (ties averaged) 5, 3, 5,
    # 1.5, 5, 1.5, both with mean 3.5: Σdxdy = 7.5, Σdx² = 17.5, Σdy² = 15.
    # Kendall τ-b: 8 concordant, 3 discordant pairs of 15; 4 pairs tied in the label only.
    spearman_a, kendall_a = 7.5 / math.sqrt(17.5 * 15), 5 / math.sqrt(15 * 11)
    # Prompt C: two images, unsure scored above misaligned: both correlations are 1.
    assert summary["spearman"] == pytest.approx((spearman_a + 1) / 2)
    assert summary["kendall"] == pytest.approx((kendall_a + 1) / 2)
    assert {key: summary[key] for key in tia2.COUNTS} == {
        "prompts_used": 2,
        "prompts_skipped": 1,
        "prompts_no_aligned": 1,
        "images_scored": 10,
        "images_missing": 1,
    }
    assert reward.images == 10


def test_precision_at_k_counts_a_tie_at_the_cut_by_expectation():
    scores = np.array([1.0, 0.5, 0.5, 0.5, 0.0])
    aligned = np.array([False, True, False, False, True])
    # One place left after the top image, shared by three tied images of which one is aligned.
    assert tia2.precision_at_k(scores, aligned, 2) == pytest.approx((0 + 1 / 3) / 2)
    assert tia2.precision_at_k(scores, aligned, 4) == pytest.approx(1 / 4)


def test_a_constant_reward_has_chance_auroc_and_no_correlation():
    result = tia2.prompt_metrics(np.zeros(4), np.array([1, -1, 0, 1]))
    assert result["auroc"] == 0.5 and result["spearman"] == 0.0 and result["kendall"] == 0.0


def test_one_json_file_is_one_subset_named_by_its_stem(tmp_path):
    folder = write_tia2(tmp_path, PROMPT_C, subset="composition")
    renamed = folder / "human_labels_composition.json"  # as the TextNorm repository names it
    (folder / "composition.json").rename(renamed)
    dataset = tia2.load(renamed)
    assert list(dataset.subsets) == ["composition"] and not dataset.subsets["composition"].missing


def test_scores_are_cached_so_one_more_reward_scores_only_that_reward(toy, monkeypatch):
    built: dict[str, list[Brightness]] = {"tia2-test-brightness": [], "tia2-test-darkness": []}
    for name, sign in (("tia2-test-brightness", 1.0), ("tia2-test-darkness", -1.0)):

        def factory(name=name, sign=sign, scale=1.0):
            built[name].append(Brightness(name, sign, scale))
            return built[name][-1]

        monkeypatch.setitem(base._REGISTRY, name, RewardInfo(name, factory, "test", False, False))
    with pytest.warns(UserWarning, match="not found"):
        dataset = tia2.load(toy)

    first = tia2.run(["tia2-test-brightness"], dataset, batch_size=4, output=None, progress=False)
    assert [reward.images for reward in built["tia2-test-brightness"]] == [10]
    assert [reward.calls for reward in built["tia2-test-brightness"]] == [3]  # batches of 4, 4, 2
    second = tia2.run(
        ["tia2-test-brightness", "tia2-test-darkness"], dataset, batch_size=4, output=None, progress=False
    )
    assert len(built["tia2-test-brightness"]) == 1  # fully cached: not even built again
    assert [reward.images for reward in built["tia2-test-darkness"]] == [10]
    assert second["results"]["tia2-test-brightness"] == first["results"]["tia2-test-brightness"]
    assert second["results"]["tia2-test-darkness"]["counting"]["auroc"] == pytest.approx(1 - 6 / 9)
    cache = toy / tia2.SCORE_CACHE
    assert len(list(cache.glob("*.json"))) == 2 and not list(cache.glob(".*"))  # no temporary files left
    # Other options are another identity, and a changed image another dataset: both rescored.
    doubled = tia2.score("tia2-test-brightness", dataset, options={"scale": 2.0}, progress=False)
    assert len(built["tia2-test-brightness"]) == 2 and built["tia2-test-brightness"][-1].scale == 2.0
    assert doubled["counting"]["a0.png"] == pytest.approx(2 * 230 / 255)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(toy / "counting" / "c1.png")
    with pytest.warns(UserWarning, match="not found"):
        changed = tia2.load(toy)
    assert changed.fingerprint != dataset.fingerprint
    tia2.score("tia2-test-brightness", changed, progress=False)
    assert len(built["tia2-test-brightness"]) == 3 and built["tia2-test-brightness"][-1].images == 10


def test_bad_labels_are_an_error_naming_the_entry_and_file(tmp_path):
    write_tia2(tmp_path, [("x.png", "prompt", 10, [1, 2, 0])])
    with pytest.raises(tia2.TIA2Error, match=r"counting.json, entry 'x.png'.*\[1, 2, 0\]"):
        tia2.load(tmp_path)
    write_tia2(tmp_path, [("x.png", "prompt", 10, [])])
    with pytest.raises(tia2.TIA2Error, match="one or more of 1"):
        tia2.load(tmp_path)


def test_a_corrupt_image_is_an_error_naming_it(tmp_path):
    folder = write_tia2(tmp_path, PROMPT_C)
    (folder / "counting" / "c1.png").write_bytes(b"not a png")
    with pytest.raises(images.ImageError, match="c1.png"):
        tia2.evaluate(Brightness(), folder, progress=False)


def test_a_failing_reward_is_named_with_the_images_of_its_batch(toy):
    class FailsOnPromptC(Brightness):
        def forward(self, pixels, prompts):
            if "prompt c" in prompts:
                raise RuntimeError("model exploded")
            return super().forward(pixels, prompts)

    with pytest.warns(UserWarning, match="not found"):
        dataset = tia2.load(toy)
    with pytest.raises(tia2.TIA2Error) as caught:
        tia2.evaluate(FailsOnPromptC(), dataset, batch_size=4, progress=False)
    message = str(caught.value)
    assert "'tia2-test-brightness'" in message and "model exploded" in message
    assert "2 images (counting/c0.png, counting/c1.png)" in message  # the third batch: a0-a3, a4-b1, c0-c1
    assert "b1.png" not in message


def test_an_unknown_subset_is_an_error_listing_the_subsets(toy, capsys):
    with pytest.warns(UserWarning, match="not found"):
        assert main(["bench", "tia2", "--data", str(toy), "--subsets", "countin", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "unknown TIA2 subset 'countin'" in error and "Did you mean 'counting'" in error


def test_annotator_noise_flips_at_its_rate_to_another_label():
    rng = np.random.default_rng(0)
    labels = np.array([shapes_tia.annotate(0, 3, 0.3, rng) for _ in range(2000)])
    assert set(np.unique(labels)) == {-1, 0, 1}
    assert np.mean(labels != 0) == pytest.approx(0.3, abs=0.03)  # 6000 draws: 3 standard errors ≈ 0.018
    assert np.mean(labels == 1) == pytest.approx(np.mean(labels == -1), abs=0.03)
    assert shapes_tia.annotate(1, 3, 0.0, rng) == [1, 1, 1]
    assert [shapes_tia.clean_label(s) for s in (1.0, 0.75, 2 / 3, 0.5, 0.0)] == [1, 0, 0, -1, -1]


def test_ensure_builds_once_into_a_folder_named_by_the_settings(tmp_path, monkeypatch):
    config = shapes_tia.ShapesTiaConfig(prompts_per_subset=1, images_per_prompt=1)
    calls = []

    def fake_generate(folder: Path, config, progress):
        calls.append(folder)
        (folder / "counting.json").write_text("{}", "utf-8")

    monkeypatch.setattr(shapes_tia, "_generate", fake_generate)
    folder = shapes_tia.ensure(config, root=tmp_path, progress=False)
    assert shapes_tia.ensure(config, root=tmp_path, progress=False) == folder and len(calls) == 1
    assert folder.parent == tmp_path / "shapes-tia" and folder.name.startswith(f"v{shapes_tia.VERSION}-")
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # the staging folder was renamed
    assert shapes_tia.default_folder(shapes_tia.ShapesTiaConfig(noise=0.2), tmp_path) != folder
    with pytest.raises(ValueError, match="not an empty folder"):
        shapes_tia.make(folder, config)


@pytest.fixture(scope="module")
def tiny_shapes_tia(tmp_path_factory) -> Path:
    """shapes-TIA at 2 prompts × 4 images per subset, 6 steps, no annotator noise, via the CLI."""
    folder = tmp_path_factory.mktemp("shapes-tia") / "data"
    assert (
        main(
            [
                "bench",
                "shapes-tia",
                "--output",
                str(folder),
                "--prompts-per-subset",
                "2",
                "--images-per-prompt",
                "4",
                "--num-steps",
                "6",
                "--noise",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    return folder


def test_shapes_tia_is_tia2_format_labelled_by_the_detector(tiny_shapes_tia):
    from diffalign.shapes import parse, score

    dataset = tia2.load(tiny_shapes_tia)
    assert list(dataset.subsets) == list(shapes_tia.SUBSETS)
    kinds = {"counting": {"count"}, "composition": {"relation"}}
    for name, subset in dataset.subsets.items():
        assert len(subset.entries) == 8 and not subset.missing
        assert len({entry.caption for entry in subset.entries}) == 2
        assert {parse(entry.caption).kind for entry in subset.entries} <= kinds.get(
            name, {"single", "count", "relation"}
        )
        for entry in subset.entries:
            clean = shapes_tia.clean_label(
                score(np.asarray(Image.open(entry.path).convert("RGB")), entry.caption)
            )
            assert entry.labels == (clean, clean, clean)
    assert any(
        len({e.label for e in s.entries if e.caption == c}) > 1
        for s in dataset.subsets.values()
        for c in {e.caption for e in s.entries}
    )


def test_cli_writes_table_csv_json_and_chart(tiny_shapes_tia, tmp_path, capsys):
    output = tmp_path / "out"
    argv = [
        "bench",
        "tia2",
        "--data",
        str(tiny_shapes_tia),
        "--rewards",
        "shapes-oracle",
        "shapes-clip",
        "--output",
        str(output),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "shapes-oracle" in table and "composition" in table and "auroc" in table
    rows = list(csv.DictReader((output / "tia2.csv").open(encoding="utf-8")))
    assert [(row["reward"], row["subset"]) for row in rows] == [
        (reward, subset) for reward in ("shapes-oracle", "shapes-clip") for subset in shapes_tia.SUBSETS
    ]
    written = json.loads((output / "tia2.json").read_text("utf-8"))
    # With noise-free labels derived from the detector, the oracle ranks every prompt perfectly.
    oracle = written["results"]["shapes-oracle"]
    defined = [summary["auroc"] for summary in oracle.values() if summary["auroc"] is not None]
    assert defined and all(value == 1.0 for value in defined)
    assert all(summary["images_scored"] == 8 for summary in oracle.values())
    assert written["per_prompt"]["shapes-clip"].keys() == set(shapes_tia.SUBSETS)
    assert (output / "tia2.png").stat().st_size > 5_000
