"""The gradient-SNR benchmark computes real gradient estimates and writes its cosines."""

import json

from diffalign.benchmarks import gradient_snr


def test_quick_run_writes_cosines(tmp_path, capsys):
    gradient_snr.main(["--quick", "--output", str(tmp_path / "study")])
    output = tmp_path / "study" / "gradient_snr.json"
    entry = json.loads(output.read_text("utf-8"))["rewards"]["brightness"]
    assert set(entry) == {"policy_gradient_independent_noise", "policy_gradient_shared_noise", "pathwise"}
    assert all(-1 <= value["mean"] <= 1 and value["pairs"] == 3 for value in entry.values())
    # Pathwise estimates of the same smooth reward agree far better than chance.
    assert entry["pathwise"]["mean"] > 0.5
    assert "PG, shared x_T" in capsys.readouterr().out
