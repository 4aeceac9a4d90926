"""The MuDI study runs end to end in quick mode and its summary is computed from the runs it made."""

import json

import pytest
from diffalign.benchmarks import mudi as study


def _evaluation(success, mixed=0.0):
    return {"success": success, "mixed": mixed, "dnc": success, "all_present": success, "fidelity": 1.0}


def test_summary_gives_each_arm_its_seeds_spread_and_mudi_is_segmix_with_the_shift():
    runs = [
        {
            "pair": f"similar-{seed + 1}",
            "seed": seed,
            "mode": "segmix",
            "cpu_seconds": 10.0 * (seed + 1),
            "evaluations": {"0.0": _evaluation(0.1 * seed), "0.5": _evaluation(0.2 + 0.1 * seed, 0.5)},
        }
        for seed in range(3)
    ]
    summary = study.summarise(runs, 0.5)["similar"]
    assert summary["mudi-no-init"]["success"]["values"] == pytest.approx([0.0, 0.1, 0.2])
    assert summary["mudi"]["success"]["mean"] == pytest.approx(0.3)
    assert summary["mudi"]["success"]["std"] == pytest.approx(0.1)
    assert summary["mudi"]["mixed"]["min"] == 0.5
    assert summary["mudi"]["cpu_seconds"]["mean"] == pytest.approx(20.0)
    assert "| similar | mudi | 0.30 ± 0.10 |" in study.table({"similar": summary})


@pytest.mark.slow
@pytest.mark.parametrize("model", ["shapes", "shapes-flow"])
def test_quick_study_writes_json_plot_grid_and_table(tmp_path, monkeypatch, capsys, model):
    monkeypatch.setenv("DIFFALIGN_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "study"
    code = study.main(
        [
            "--model",
            model,
            "--seeds",
            "0",
            "--pairs",
            "similar-1",
            "--jobs",
            "1",
            "--modes",
            "dreambooth",
            "segmix",
            "--steps",
            "2",
            "--images",
            "1",
            "--sample-steps",
            "2",
            "--gamma",
            "0.5",
            "--set",
            "prior.class_images=2",
            "--set",
            "prior.num_steps=3",
            "--set",
            "eval.num_steps=2",
            "--set",
            "eval.images_per_prompt=1",
            "--output",
            str(output),
        ]
    )
    assert code == 0
    result = json.loads((output / "mudi.json").read_text())
    assert result["settings"]["model"] == model
    arms = result["summary"]["similar"]
    assert {"base", "dreambooth", "dreambooth+init", "mudi-no-init", "mudi"} <= set(arms)
    for arm in arms.values():
        for metric in ("success", "mixed", "dnc", "fidelity"):
            assert 0.0 <= arm[metric]["mean"] <= 1.0
    trained = [run for run in result["runs"] if run["mode"] != "base"]
    assert [run["mode"] for run in trained] == ["dreambooth", "segmix"]
    assert all(run["cpu_seconds"] > 0 and "images" not in run["evaluations"]["0.0"] for run in trained)
    assert (output / "mudi.png").is_file() and (output / "grid-similar-1.png").is_file()
    assert "| similar | mudi |" in capsys.readouterr().out
