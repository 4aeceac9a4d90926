"""The Flow-DPO study runs end to end in quick mode: three arms, the on-policy set built on the way."""

import json

import pytest
from diffalign.benchmarks import flow_dpo


@pytest.mark.slow
def test_quick_study_builds_the_flow_pairs_and_writes_json_plot_and_table(tmp_path, capsys):
    output = tmp_path / "study"
    argv = ["--quick", "--jobs", "1", "--flow-pairs", "16", "--output", str(output)]
    argv += ["--set", "eval.size=4", "--set", "eval.num_steps=4", "--set", "train.batch_size=2"]
    assert flow_dpo.main(argv) == 0
    result = json.loads((output / "flow_dpo.json").read_text())
    assert (output / "shapes-prefs-flow" / "recipe.json").is_file()
    assert (
        json.loads((output / "shapes-prefs-flow" / "recipe.json").read_text())["recipe"]["model"]
        == "shapes-flow"
    )
    assert result["composition"]["flow"]["pairs"] <= 16
    assert (
        {run["variant"] for run in result["runs"]} == set(result["summary"]["variants"]) == set(flow_dpo.ARMS)
    )
    for entry in result["summary"]["variants"].values():
        assert entry["evaluations"] == 3  # the base and two evaluations along the run
        assert set(entry["final_change"]) == set(flow_dpo.ORACLE_KEYS)
        assert 0.0 <= entry["training_log"]["implicit_accuracy"]["final_mean"] <= 1.0
    assert (output / "flow_dpo.png").is_file()
    printed = capsys.readouterr().out
    assert "| flow-own-pairs |" in printed and "| shapes-flow |" in printed
    # The summary can be made again from the saved runs, elsewhere; never over its own input.
    again = tmp_path / "again"
    assert flow_dpo.main(["--from-json", str(output / "flow_dpo.json"), "--output", str(again)]) == 0
    before = (output / "flow_dpo.json").read_bytes()
    with pytest.raises(SystemExit):
        flow_dpo.main(["--from-json", str(output / "flow_dpo.json"), "--output", str(output)])
    assert (output / "flow_dpo.json").read_bytes() == before
