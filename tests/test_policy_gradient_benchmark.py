"""benchmarks/policy_gradient.py: the target is read at a CPU-minute budget, peers are read from
their own files, and a smoke run writes its JSON and plot."""

import json

import pytest
from diffalign.benchmarks import policy_gradient as pg


def fake_run(variant, seed, changes, train_seconds, threads=1, base=0.8):
    return {
        "variant": variant,
        "seed": seed,
        "threads": threads,
        "seconds": train_seconds[-1] + 60,
        "train_seconds": train_seconds,
        "queries": [64 * 10 * i for i in range(len(changes))],
        "curves": {pg.TRAIN_ORACLE: [base + c for c in changes], pg.HELDOUT_ORACLE: [0.3] * len(changes)},
    }


def test_the_target_is_read_at_the_last_evaluation_within_the_cpu_budget():
    seconds = [0, 600, 1200, 1800, 2400]
    one = fake_run("a", 0, [0, 0.02, 0.04, 0.06, 0.10], seconds)
    # Two threads: every training second costs two CPU seconds, so 30 CPU minutes end at 900 s.
    two = fake_run("a", 1, [0, 0.06, 0.01, 0.09, 0.10], seconds, threads=2)
    assert pg.at_budget(one, 30)["change"] == pytest.approx(0.06)
    assert pg.at_budget(one, 30)["cpu_minutes"] == pytest.approx(30)
    assert pg.at_budget(two, 30)["change"] == pytest.approx(0.06) and pg.at_budget(two, 30)["queries"] == 640
    assert pg.at_budget({**one, "threads": None}, 30) is None
    assert not pg.summarise([one, two], 0.05, 30)["variants"]["a"]["target_met_at_budget"]  # 2 seeds < 3
    also = fake_run("a", 3, [0, 0.01, 0.02, 0.05, 0.2], seconds)
    assert pg.summarise([one, two, also], 0.05, 30)["variants"]["a"]["target_met_at_budget"]
    # A third seed that stays below the target within the budget fails the variant, even though it
    # ends above it later.
    three = fake_run("a", 2, [0, 0.01, 0.02, 0.04, 0.2], seconds)
    summary = pg.summarise([one, two, three], 0.05, 30)
    assert not summary["variants"]["a"]["target_met_at_budget"]
    pg._per_seed([one, two, three], summary)
    table = pg.format_table(summary)
    assert "+0.040 (1920 q, 30 min)" in table and "target met" not in table


def test_peer_runs_are_read_with_their_thread_count(tmp_path):
    folder = tmp_path / "peer" / "trl-ddpo-seed0"
    folder.mkdir(parents=True)
    records = [{"epoch": 0, "samples_seen": 0, pg.TRAIN_ORACLE: 0.8, pg.HELDOUT_ORACLE: 0.3}]
    records += [{"epoch": e, "samples_seen": 64 * e, "seconds": 30.0, "seed": 0} for e in (1, 2)]
    records[-1].update({pg.TRAIN_ORACLE: 0.9, pg.HELDOUT_ORACLE: 0.31})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "trl_settings.json").write_text(json.dumps({"torch_threads": 1}))
    (run,) = pg.read_peers([f"trl-x={tmp_path / 'peer'}"])
    assert run["variant"] == "trl-x"
    assert run["threads"] == 1 and run["queries"] == [0, 128] and run["train_seconds"] == [0.0, 60.0]
    assert pg.at_budget(run, 30)["change"] == pytest.approx(0.1)


def test_quick_run_writes_json_and_plot(tmp_path, capsys):
    assert (
        pg.main(
            [
                "--quick",
                "--variants",
                "ddpo-gaussian",
                "--jobs",
                "1",
                "--threads",
                "1",
                "--output",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "policy_gradient.json").read_text())
    (run,) = result["runs"]
    assert run["threads"] == 1 and run["queries"] == [0, 16, 32]
    assert (tmp_path / "policy_gradient.png").stat().st_size > 10_000
    assert "CPU min" in capsys.readouterr().out


def test_runs_trained_one_by_one_are_summarised_under_their_variant(tmp_path, capsys):
    seconds = [0, 600, 1200, 1800, 2400]
    paths = []
    for seed, changes in enumerate(
        ([0, 0.02, 0.05, 0.07, 0.08], [0, 0.03, 0.06, 0.06, 0.09], [0, 0, 0, 0.05, 0])
    ):
        path = tmp_path / f"run{seed}.json"
        path.write_text(json.dumps(fake_run("screen-name", seed, changes, seconds)))
        paths.append(f"ddpo-gaussian-lr3e-4={path}")
    assert pg.main(["--from-runs", *paths, "--output", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "policy_gradient.json").read_text())
    entry = result["summary"]["variants"]["ddpo-gaussian-lr3e-4"]
    assert [r["change"] for r in entry["at_budget"]] == pytest.approx([0.07, 0.06, 0.05])
    assert entry["target_met_at_budget"] and "target met" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        pg.main(["--from-runs", f"no-such-variant={paths[0]}", "--output", str(tmp_path / "out2")])
