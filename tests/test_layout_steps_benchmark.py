"""The layout probe: its AUROC, its converse prompts, and a quick run that writes its JSON."""

import json

import numpy as np
from diffalign.benchmarks import layout_steps


def test_auroc_matches_the_rank_sum_formula():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=40), 1)  # rounded: ties happen
    labels = rng.random(40) < 0.4
    # Mann-Whitney: U = R_pos - n_pos (n_pos + 1) / 2 with average ranks for ties
    order = scores.argsort(kind="stable")
    ranks = np.empty(40)
    ranks[order] = np.arange(1, 41)
    for value in np.unique(scores):
        ranks[scores == value] = ranks[scores == value].mean()
    n_pos, n_neg = labels.sum(), (~labels).sum()
    expected = (ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    assert abs(layout_steps.auroc(scores, labels) - expected) < 1e-12
    assert layout_steps.auroc(np.array([2.0, 1.0]), np.array([True, False])) == 1.0
    assert np.isnan(layout_steps.auroc(np.array([1.0]), np.array([True])))


def test_converse_swaps_only_the_relation():
    assert (
        layout_steps.conversed("a red circle left of a blue square") == "a red circle right of a blue square"
    )
    assert (
        layout_steps.conversed("a green triangle above a cyan circle")
        == "a green triangle below a cyan circle"
    )


def test_quick_probe_writes_every_step(tmp_path):
    assert layout_steps.main(["--quick", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "layout_steps.json").read_text())
    assert [row["step"] for row in result["rows"]] == list(range(6))
    assert all(0 <= row["agree"] <= row["detectable"] <= 8 for row in result["rows"])
    assert result["rows"][-1]["agree"] == result["rows"][-1]["detectable"]  # x0 of the last step is the image
