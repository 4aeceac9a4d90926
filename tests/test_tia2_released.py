"""TIA2 as its authors compute it: AP@k against independent computations, the AP@k definition
against their released values, our labels against their released files, the side-by-side with
``--reference``, and their contrast files through ``contrast: file:PATH``.

Everything released is read from ``tests/fixtures/tia2_released`` (a cut of the authors' files;
see its README), never from elsewhere on the machine.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffalign.benchmarks import tia2, tia2_ap_definition
from diffalign.rewards import RewardInfo, TextNorm, base, build
from PIL import Image
from sklearn.metrics import average_precision_score

RELEASED = Path(__file__).parent / "fixtures" / "tia2_released"
SUBSETS = ("comprehensive", "counting", "composition")


def released_labels(folder: Path = RELEASED) -> tia2.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the release has no images
        return tia2.load(folder / "human_annotations", progress=False)


def released_json(kind: str, subset: str, folder: Path = RELEASED) -> dict:
    names = {
        "alignment_scores": "alignment_scores_",
        "prompts": "prompt_set_",
        "human_annotations": "human_labels_",
    }
    return json.loads((folder / kind / f"{names[kind]}{subset}.json").read_text("utf-8"))


# --- AP@k against independent computations ----------------------------------------------------------


def ap_at_k_by_definition(scores, aligned, k) -> float:
    """Untied scores: the mean over the aligned images among the k best of the precision at each one's rank."""
    ranked = [a for _, a in sorted(zip(scores, aligned), key=lambda pair: -pair[0])][:k]
    precisions = [sum(ranked[: i + 1]) / (i + 1) for i, a in enumerate(ranked) if a]
    return float(np.mean(precisions)) if precisions else 0.0


def test_ap_at_k_is_the_mean_precision_at_the_aligned_ranks_of_the_top_k():
    # Aligned at ranks 2, 3, 4 of the top 5: (1/2 + 2/3 + 3/4) / 3 = 23/36, the value the authors
    # released for CLIP on "a realistic photo of an airplane" (checked against the file below).
    scores = np.array([9.0, 8, 7, 6, 5, 4, 3])
    aligned = np.array([0, 1, 1, 1, 0, 1, 1])
    assert tia2.average_precision_at_k(scores, aligned, 5) == pytest.approx(23 / 36, abs=1e-12)
    assert tia2.average_precision_at_k(scores, aligned, 1) == 0.0  # nothing aligned in the top 1
    assert tia2.average_precision_at_k(scores, aligned, 25) == pytest.approx(
        ap_at_k_by_definition(scores, aligned, 7)
    )  # fewer images than k: all of them
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 30))
        scores, aligned = rng.normal(size=n), rng.integers(0, 2, size=n)
        for k in (1, 5, 10, 25):
            assert tia2.average_precision_at_k(scores, aligned, k) == pytest.approx(
                ap_at_k_by_definition(scores, aligned, k), abs=1e-12
            )


def test_ap_at_k_groups_ties_inside_the_top_k_as_sklearn_does():
    rng = np.random.default_rng(1)
    for _ in range(50):
        scores = rng.integers(0, 4, size=12).astype(float)  # many ties
        aligned = rng.integers(0, 2, size=12)
        ranked = np.sort(scores)[::-1]
        for k in range(1, 13):
            if k < 12 and ranked[k - 1] == ranked[k]:
                continue  # a tie across the cut: the next test
            top = np.argsort(-scores, kind="stable")[:k]
            expected = average_precision_score(aligned[top], scores[top]) if aligned[top].any() else 0.0
            assert tia2.average_precision_at_k(scores, aligned, k) == pytest.approx(expected, abs=1e-12)


def test_ap_at_k_counts_a_tie_at_the_cut_by_expectation_over_which_images_are_in():
    rng = np.random.default_rng(2)
    for _ in range(30):
        scores = rng.integers(0, 3, size=9).astype(float)
        aligned = rng.integers(0, 2, size=9)
        for k in (2, 4, 6):
            threshold = np.sort(scores)[::-1][k - 1]
            above, tied = np.flatnonzero(scores > threshold), np.flatnonzero(scores == threshold)
            values = []
            for chosen in itertools.combinations(tied, k - len(above)):
                top = np.concatenate([above, chosen]).astype(int)
                values.append(
                    average_precision_score(aligned[top], scores[top]) if aligned[top].any() else 0.0
                )
            assert tia2.average_precision_at_k(scores, aligned, k) == pytest.approx(
                np.mean(values), abs=1e-12
            )


def test_prompt_metrics_report_ap_at_k_beside_p_at_k():
    metrics = tia2.prompt_metrics(np.array([3.0, 2.0, 1.0]), np.array([0, 1, 0]))
    assert metrics["p@5"] == pytest.approx(1 / 3) and metrics["ap@5"] == pytest.approx(1 / 2)
    assert set(tia2.RANKING_METRICS) >= {"ap@5", "ap@10", "ap@25"}


# --- the definition, established from the released values --------------------------------------------


def test_the_released_ap5_of_the_airplane_prompt_is_23_over_36():
    record = released_json("alignment_scores", "counting")["a realistic photo of an airplane"]
    assert record["clip"]["ap5"] == pytest.approx(23 / 36, abs=1e-12)
    # 38 of its 50 images are aligned (human = 0.76). Only the mean over the aligned images in the
    # top 5 gives 23/36; dividing by 5, by min(5, 38) or by 38 cannot.
    fitted = tia2_ap_definition.fits(23 / 36, 5, 50, 38)
    assert fitted == {"hits": True, "min(k,R)": False, "k": False, "R": False, "mean P@i": False}


def test_only_the_mean_over_aligned_images_in_the_top_k_fits_every_released_value():
    counts = tia2_ap_definition.derive(RELEASED, ks=(5, 10))
    untied = [key for key in counts["values"] if key[1] != "clip"]  # CLIP's scores have ties (below)
    # 8 released prompts x 4 models without ties (the last a TextNorm variant) x 2 values of k
    assert len(untied) == 2 * 5 and sum(counts["values"][key] for key in untied) == 8 * 4 * 2
    for key in untied:
        assert counts["fit"][(*key, "hits")] == counts["values"][key], key
    for other in ("min(k,R)", "k", "R", "mean P@i"):
        assert sum(counts["fit"][(*key, other)] for key in untied) < sum(
            counts["values"][key] for key in untied
        )
    # CLIP's values that no untied ranking gives are all sklearn-style tie groups of the same metric.
    for k in (5, 10):
        assert counts["misses"][k, "clip"] >= 1
        assert counts["tied"][k, "clip"] == counts["misses"][k, "clip"]


# --- our labels against the released files -------------------------------------------------------------


def test_our_ground_truth_gives_the_released_human_share_and_skips_exactly_the_absent_prompts():
    dataset, reference = released_labels(), tia2.load_reference(RELEASED)
    assert list(reference.subsets) == list(SUBSETS)
    for subset in SUBSETS:
        check = tia2.check_labels(dataset.subsets[subset], reference.subsets[subset])
        assert check["agrees"], check
        assert check["skipped"] == 1 and check["released"] == check["prompts"] - 1
        # independently: the share of images with at least two of three labels equal to 1
        labels = released_json("human_annotations", subset)
        for prompt, record in reference.subsets[subset].items():
            votes = [
                sum(label == 1 for label in e["human_labels"])
                for e in labels.values()
                if e["caption"] == prompt
            ]
            assert record["human"] == pytest.approx(np.mean([v >= 2 for v in votes]), abs=1e-12)


def test_a_changed_label_is_reported_as_a_disagreement(tmp_path):
    folder = tmp_path / "released"
    shutil.copytree(RELEASED, folder)
    path = folder / "human_annotations" / "human_labels_counting.json"
    labels = json.loads(path.read_text("utf-8"))
    first = next(key for key, e in labels.items() if e["caption"] == "a realistic photo of an airplane")
    labels[first]["human_labels"] = [-1, -1, 0] if sum(labels[first]["human_labels"]) >= 2 else [1, 1, 1]
    everyone_aligned = [key for key, e in labels.items() if e["caption"] == "a realistic photo of a bird"]
    labels[everyone_aligned[0]]["human_labels"] = [0, 0, 0]  # the skipped prompt now has two labels
    path.write_text(json.dumps(labels), "utf-8")
    check = tia2.check_labels(
        released_labels(folder).subsets["counting"], tia2.load_reference(folder).subsets["counting"]
    )
    assert not check["agrees"]
    assert [m["prompt"] for m in check["human_mismatches"]] == ["a realistic photo of an airplane"]
    assert check["ranked_but_absent"] == ["a realistic photo of a bird"]
    assert "DISAGREE" in tia2.format_label_check("counting", check)


def test_reference_errors_name_the_file(tmp_path):
    with pytest.raises(tia2.TIA2Error, match="alignment_scores_<subset>.json"):
        tia2.load_reference(tmp_path)
    (tmp_path / "alignment_scores_counting.json").write_text(json.dumps({"p": {"human": 2}}), "utf-8")
    with pytest.raises(
        tia2.TIA2Error, match=r"alignment_scores_counting.json, prompt 'p'.*share in \[0, 1\]"
    ):
        tia2.load_reference(tmp_path)


# --- the side-by-side ------------------------------------------------------------------------------------


class Brightness(torch.nn.Module):
    """A stand-in reward: an image's mean grey level."""

    name, differentiable = "tia2-released-brightness", False

    def forward(self, pixels, prompts):
        return pixels.mean(dim=(1, 2, 3))


@pytest.fixture()
def stand_in(tmp_path, monkeypatch) -> Path:
    """The fixture's labels with a grey 4x4 image per labelled image, brighter where more annotators
    said 1 plus a per-image jitter; one counting prompt's images left out."""
    monkeypatch.setitem(
        base._REGISTRY,
        Brightness.name,
        RewardInfo(Brightness.name, lambda: Brightness(), "test", False, False),
    )
    folder = tmp_path / "tia2"
    rng = np.random.default_rng(0)
    for subset in SUBSETS:
        labels = released_json("human_annotations", subset)
        (folder / subset).mkdir(parents=True)
        (folder / f"human_labels_{subset}.json").write_text(json.dumps(labels), "utf-8")
        for key, entry in labels.items():
            if entry["caption"] == "a realistic photo of two cats":
                continue
            grey = int(40 * sum(label == 1 for label in entry["human_labels"]) + rng.integers(0, 120))
            Image.new("RGB", (4, 4), (grey, grey, grey)).save(folder / subset / key)
    return folder


def test_compare_puts_our_means_beside_theirs_on_the_prompts_both_scored(stand_in):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the left-out images
        result = tia2.run(
            [Brightness.name],
            stand_in,
            cache=False,
            output=None,
            progress=False,
            reference=RELEASED,
            reference_models={Brightness.name: "pickscore"},
        )
    comparison = result["reference"]
    assert all(check["agrees"] for check in comparison["labels"].values())
    rows = {row["subset"]: row for row in comparison["rows"]}
    assert {row["model"] for row in rows.values()} == {"pickscore"} and set(rows) == set(SUBSETS)
    assert (
        rows["counting"]["prompts"] == 2 and rows["counting"]["released_only"] == 1
    )  # "two cats" has no images
    for subset, row in rows.items():
        released = released_json("alignment_scores", subset)
        ours = result["per_prompt"][Brightness.name][subset]
        both = [p for p in released if p in ours]
        assert row["prompts"] == len(both) and row["ours_only"] == 0
        for metric, key in tia2.REFERENCE_METRICS.items():
            assert row["released"][metric] == pytest.approx(
                np.mean([released[p]["pickscore"][key] for p in both])
            )
            assert row["ours"][metric] == pytest.approx(np.mean([ours[p][metric] for p in both]))
    assert rows["counting"]["ours"]["auroc"] > 0.75  # the stand-in images are brighter when aligned
    table = tia2.format_comparison(comparison)
    assert f"{rows['counting']['ours']['auroc']:.3f}/{rows['counting']['released']['auroc']:.3f}" in table


def test_rewards_map_to_released_models_by_default_or_by_name():
    models = ["clip", "blip2", "imagereward", "pickscore", "textnorm_ur"]
    assert tia2.reference_model("clip-score", models) == "clip"
    assert (
        tia2.reference_model("textnorm-ur(clip-score,blip2,imagereward,pickscore)", models) == "textnorm_ur"
    )
    assert tia2.reference_model("shapes-clip", models) is None
    assert tia2.reference_model("shapes-clip", models, {"shapes-clip": "clip"}) == "clip"


def test_module_cli_prints_released_means_and_the_side_by_side(stand_in, tmp_path, capsys):
    assert tia2.main(["--reference", str(RELEASED), "--data", str(RELEASED / "human_annotations")]) == 0
    out = capsys.readouterr().out
    auroc = np.mean(
        [r["imagereward"]["auroc"] for r in released_json("alignment_scores", "composition").values()]
    )
    assert f"composition    imagereward          2    {auroc:.3f}" in out
    assert out.count("exactly the ones absent from the release") == 3
    argv = ["--rewards", Brightness.name, "--data", str(stand_in), "--subsets", "counting", "--no-cache"]
    argv += ["--reference", str(RELEASED), "--reference-model", f"{Brightness.name}=clip", "--no-progress"]
    argv += ["--output", str(tmp_path / "module-out")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tia2.main(argv) == 0
    assert (tmp_path / "module-out" / "tia2.json").is_file()
    out = capsys.readouterr().out
    assert "beside the released figures" in out and f"{Brightness.name:<22} clip" in out
    assert tia2.main(["--reference", str(RELEASED / "nowhere")]) == 2


# --- the authors' contrast files -------------------------------------------------------------------------


@pytest.mark.parametrize("subset", SUBSETS)
def test_the_released_contrast_files_load_through_contrast_file(subset):
    path = RELEASED / "prompts" / f"prompt_set_{subset}.json"
    released = released_json("prompts", subset)
    reward = build(
        "textnorm(imagereward)", contrast=f"file:{path}", imagereward={"checkpoint": "tiny-random"}
    )
    for prompt, contrasts in released.items():
        distinct = list(dict.fromkeys(c for c in contrasts if c.strip() != prompt.strip()))
        assert list(reward.contrasts(prompt)) == distinct
    scores = reward(torch.rand(len(released), 3, 32, 32), list(released))
    assert scores.shape == (len(released),) and bool(((scores > 0) & (scores < 1)).all())


def test_released_contrast_sets_with_themselves_or_repeats_are_reduced_to_distinct_contrasts():
    itself = "A red car and a white sheep."
    repeated = "a realistic photo of an airplane and an automobile"
    comprehensive = released_json("prompts", "comprehensive")[itself]
    composition = released_json("prompts", "composition")[repeated]
    assert itself in comprehensive and len(set(composition)) == len(composition) - 1
    contrast = TextNorm(
        build("imagereward", checkpoint="tiny-random"),
        contrast=f"file:{RELEASED / 'prompts' / 'prompt_set_composition.json'}",
    )
    assert len(contrast.contrasts(repeated)) == len(composition) - 1
    assert not math.isnan(float(contrast(torch.rand(1, 3, 32, 32), [repeated])))


def test_cli_prints_the_released_means_and_checks_our_labels(capsys):
    from diffalign.cli import main

    argv = ["bench", "tia2", "--reference", str(RELEASED / "alignment_scores"), "--released-means"]
    assert main([*argv, "--data", str(RELEASED / "human_annotations")]) == 0
    out = capsys.readouterr().out
    released = released_json("alignment_scores", "counting")
    models = {key for record in released.values() for key in record if key != "human"}
    assert {"clip", "imagereward", "pickscore"} <= models
    # the label check agrees with the release on every subset of the fixture
    for subset in SUBSETS:
        assert f"labels, {subset}: our majority-label share equals the released 'human' on all" in out
        assert "are exactly the ones absent from the release" in out
    assert "counting" in out and "comprehensive" in out and "composition" in out
    assert all(model in out for model in models)


def test_cli_rejects_a_malformed_reference_model(capsys):
    from diffalign.cli import main

    argv = [
        "bench",
        "tia2",
        "--reference",
        str(RELEASED),
        "--reference-model",
        "clip-score",
        "--released-means",
    ]
    assert main(argv) == 2
    assert "REWARD=MODEL" in capsys.readouterr().err
    assert main(["bench", "tia2", "--released-means"]) == 2
    assert "--released-means needs --reference" in capsys.readouterr().err


def test_diffalign_bench_tia2_prints_the_side_by_side(stand_in, tmp_path, capsys):
    from diffalign.cli import main

    argv = ["bench", "tia2", "--rewards", Brightness.name, "--data", str(stand_in), "--subsets", "counting"]
    argv += ["--reference", str(RELEASED), "--reference-model", f"{Brightness.name}=clip", "--no-cache"]
    argv += ["--no-progress", "--output", str(tmp_path / "out")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the left-out images
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert "beside the released figures" in out and f"{Brightness.name:<22} clip" in out
    assert (tmp_path / "out" / "tia2.json").is_file()


def test_the_ap_definition_study_writes_its_counts(tmp_path, capsys):
    assert tia2_ap_definition.main([str(RELEASED), "--k", "5", "--output", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "ap_definition.json").read_text("utf-8"))
    assert rows and all(row["k"] == 5 for row in rows)
    for row in rows:  # the hits normalisation fits every released value the others may miss
        assert row["fit"]["hits"] + row["misses"] == row["values"]
