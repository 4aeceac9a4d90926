"""The sample-efficiency study runs end to end in quick mode and summarises what it measured."""

import json

import pytest
from diffalign.benchmarks import sample_efficiency as study_module


def test_queries_to_reach_is_the_first_evaluated_count_at_the_target():
    assert study_module.queries_to_reach([0, 32, 64, 96], [0.5, 0.52, 0.56, 0.54], 0.55) == 64
    assert study_module.queries_to_reach([0, 32], [0.5, 0.52], 0.55) is None


def test_summary_compares_changes_since_each_seeds_base():
    key = study_module.TRAIN_ORACLE
    # Bases differ by seed (each seed evaluates its own prompts); gains are 0.0, 0.1, 0.2.
    runs = [
        {
            "variant": "ddpo",
            "seed": s,
            "seconds": 10.0 + s,
            "queries": [0, 8, 16],
            "curves": {
                k: [0.5 + 0.3 * s, 0.5 + 0.3 * s + 0.05 * s, 0.5 + 0.4 * s]
                for k in study_module.CURVES.values()
            },
        }
        for s in range(3)
    ]
    summary = study_module.summarise(runs, target_gain=0.08)
    entry = summary["variants"]["ddpo"]
    assert entry["change"][key]["mean"] == pytest.approx([0.0, 0.05, 0.1])
    assert entry["change"][key]["min"] == pytest.approx([0.0, 0.0, 0.0])
    assert entry["change"][key]["max"] == pytest.approx([0.0, 0.1, 0.2])
    assert entry["queries_to_target"] == [None, 16, 8]
    assert entry["final_change"][key]["mean"] == pytest.approx(0.1)
    assert entry["base"][key] == pytest.approx(0.8)
    assert entry["seconds_mean"] == pytest.approx(11.0)


@pytest.mark.slow
def test_quick_study_writes_json_plot_and_table(tmp_path, capsys):
    study_module.main(
        [
            "--quick",
            "--jobs",
            "1",
            "--variants",
            "ddpo+diffexp",
            "alignprop",
            "dpok",
            "--output",
            str(tmp_path / "study"),
        ]
    )
    output = tmp_path / "study" / "sample_efficiency.json"
    written = json.loads(output.read_text("utf-8"))
    assert [run["variant"] for run in written["runs"]] == ["ddpo+diffexp", "alignprop", "dpok"]
    for run in written["runs"]:
        assert run["queries"] == [0, 8, 16]
        for values in run["curves"].values():
            assert len(values) == 3 and all(0 <= v <= 1 for v in values)
    assert output.with_suffix(".png").stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "queries to target" in table and "alignprop" in table
