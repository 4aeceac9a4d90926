"""The over-optimization study: its summary keeps variants apart and it runs end to end."""

import json

import pytest
from diffalign.benchmarks import overoptimization, seeded_runs, shapes_tia


def test_summary_leaves_out_curves_a_variant_does_not_log():
    raw_key, tn_key = (
        overoptimization.CURVES["raw proxy shapes-clip (train prompts)"],
        overoptimization.CURVES["TextNorm proxy (train prompts)"],
    )
    oracle = overoptimization.TRAIN_ORACLE
    runs = [
        {
            "variant": "raw",
            "seed": 0,
            "seconds": 1.0,
            "queries": [0, 8],
            "curves": {oracle: [0.5, 0.6], raw_key: [0.8, 0.9], tn_key: []},
        },
        {
            "variant": "tn",
            "seed": 0,
            "seconds": 1.0,
            "queries": [0, 8],
            "curves": {oracle: [0.5, 0.45], raw_key: [0.8, 0.85], tn_key: [0.3, 0.5]},
        },
    ]
    summary = seeded_runs.summarise(runs, [oracle, raw_key, tn_key], oracle, 0.05)
    assert tn_key not in summary["variants"]["raw"]["change"]
    assert summary["variants"]["tn"]["final_change"][tn_key]["mean"] == pytest.approx(0.2)
    assert summary["variants"]["raw"]["queries_to_target"] == [8]
    assert summary["variants"]["tn"]["queries_to_target"] == [None]


def test_every_variant_is_evaluated_with_the_raw_proxy_and_the_oracle(tmp_path):
    from diffalign.config import load_config

    study = overoptimization.Study()
    assert len(study.variants()) == 4
    for variant in study.variants():
        config = load_config(None, study.overrides(variant, 0, tmp_path))
        scored = {config.reward, *config.eval.rewards}
        assert {"shapes-clip", "shapes-oracle"} <= scored


@pytest.mark.slow
def test_quick_study_writes_curves_auroc_table_and_plot(tmp_path, capsys):
    tia = shapes_tia.make(
        tmp_path / "tia",
        shapes_tia.ShapesTiaConfig(prompts_per_subset=2, images_per_prompt=4, num_steps=4),
        progress=False,
    )
    overoptimization.main(
        [
            "--quick",
            "--jobs",
            "1",
            "--methods",
            "alignprop",
            "--tia-data",
            str(tia),
            "--output",
            str(tmp_path / "study"),
            "--no-progress",
        ]
    )
    output = tmp_path / "study" / "overoptimization.json"
    written = json.loads(output.read_text("utf-8"))
    assert [run["variant"] for run in written["runs"]] == [
        "alignprop · shapes-clip",
        "alignprop · textnorm(shapes-clip)",
    ]
    calibrated = written["runs"][1]["curves"]
    assert len(calibrated[overoptimization.CURVES["TextNorm proxy (train prompts)"]]) == 3
    assert set(written["auroc"]) == {"shapes-clip", "textnorm(shapes-clip)"}
    assert output.with_suffix(".png").stat().st_size > 10_000
    assert "shapes-TIA" in capsys.readouterr().out
