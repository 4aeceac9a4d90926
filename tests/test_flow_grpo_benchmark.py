"""benchmarks/flow_grpo.py: runs stop at their CPU budget, changes are read per seed, the plot is written."""

import json

import pytest
from diffalign.benchmarks import flow_grpo


def fake_run(variant: str, seed: int, oracle: list[float], cpu: list[float]) -> dict:
    return {
        "variant": variant,
        "seed": seed,
        "threads": 1,
        "seconds": cpu[-1] + 10,
        "cpu_seconds": cpu,
        "queries": [64 * i for i in range(len(cpu))],
        "epochs": list(range(len(cpu))),
        "curves": {
            flow_grpo.TRAIN_ORACLE: oracle,
            flow_grpo.HELDOUT_ORACLE: [0.3] * len(cpu),
            flow_grpo.TRAIN_CLIP: [value / 2 for value in oracle],
        },
        "reward_mean": [],
    }


def test_changes_are_taken_from_each_seeds_own_base(tmp_path):
    runs = [
        fake_run("grpo-flow/oracle", 0, [0.50, 0.55, 0.60], [0, 60, 120]),
        fake_run("grpo-flow/oracle", 1, [0.70, 0.70, 0.68], [0, 61, 121]),
        fake_run("ddpo-unet/oracle", 0, [0.80, 0.81, 0.82], [0, 60, 125]),
    ]
    summary = flow_grpo.summarise(runs)
    flow = summary["grpo-flow/oracle"]["final_change"][flow_grpo.TRAIN_ORACLE]
    assert flow["per_seed"] == pytest.approx([0.10, -0.02])
    assert flow["mean"] == pytest.approx(0.04) and flow["std"] == pytest.approx(0.06)
    assert summary["grpo-flow/oracle"]["change"][flow_grpo.TRAIN_ORACLE]["min"] == pytest.approx(
        [0, 0, -0.02]
    )
    assert summary["grpo-flow/oracle"]["cpu_minutes"] == pytest.approx([0, 60.5 / 60, 120.5 / 60])
    assert summary["ddpo-unet/oracle"]["final_change"][flow_grpo.TRAIN_CLIP]["mean"] == pytest.approx(0.01)
    result = {"study": {"budget_minutes": 2.0}, "summary": summary}
    assert "+0.100, -0.020" in flow_grpo.format_table(result)
    flow_grpo.plot(summary, tmp_path / "plot.png", 2.0)
    assert (tmp_path / "plot.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_quick_run_trains_the_flow_model_to_its_budget(tmp_path, capsys):
    args = ["--quick", "--arms", "grpo-flow", "--rewards", "oracle", "--jobs", "1", "--output", str(tmp_path)]
    assert flow_grpo.main(args) == 0
    result = json.loads((tmp_path / "flow_grpo.json").read_text())
    (run,) = result["runs"]
    # The base, then an evaluation whenever an epoch crosses a mark (one epoch may cross both).
    assert run["variant"] == "grpo-flow/oracle" and 2 <= len(run["queries"]) <= 3
    assert run["cpu_seconds"][-1] >= 0.2 * 60 and run["queries"][-1] > 0
    assert all(0 <= value <= 1 for value in run["curves"][flow_grpo.TRAIN_ORACLE])
    assert (tmp_path / "flow_grpo.png").is_file() and "grpo-flow/oracle" in capsys.readouterr().out
