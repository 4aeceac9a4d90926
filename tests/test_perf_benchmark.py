"""The performance benchmark runs end to end and writes every figure it promises.

Speed itself is never asserted: CI machines are shared and a timing assertion would fail on
load, not on a regression. The full benchmark is `python -m diffalign.benchmarks.perf`.
"""

import json
import math

from diffalign.benchmarks import perf


def _positive_finite(value) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def test_quick_run_writes_positive_finite_figures(tmp_path):
    output = tmp_path / "perf.json"
    # One thread: on a shared machine two OpenMP threads stall each other and a seconds-long smoke
    # run can take minutes; the figures checked here do not depend on the thread count.
    result = perf.run(quick=True, threads=1, output=output)
    written = json.loads(output.read_text("utf-8"))

    numbers = {
        "sampling.ours.median_s": written["sampling"]["ours"]["median_s"],
        "sampling.stock.median_s": written["sampling"]["stock"]["median_s"],
        "sampling.ours_images_per_s": written["sampling"]["ours_images_per_s"],
        "sampling.stock_images_per_s": written["sampling"]["stock_images_per_s"],
        "sampling.ratio": written["sampling"]["ratio"],
        "ddpo.ddpo_epoch.median_s": written["ddpo"]["ddpo_epoch"]["median_s"],
        "ddpo.bare.median_s": written["ddpo"]["bare"]["median_s"],
        "ddpo.bare_sampling_s": written["ddpo"]["bare_sampling_s"],
        "ddpo.bare_training_s": written["ddpo"]["bare_training_s"],
        "ddpo.ratio": written["ddpo"]["ratio"],
        "ddpo.ratio_without_reward": written["ddpo"]["ratio_without_reward"],
        "ddpo.reward_s": written["ddpo"]["reward_s"],
        "ddpo.reward_share": written["ddpo"]["reward_share"],
        "machine.cpu_count": written["machine"]["cpu_count"],
        "machine.torch_threads": written["machine"]["torch_threads"],
        "wall_s": written["wall_s"],
    }
    for section, names in (("sampling", ("ours", "stock")), ("ddpo", ("ddpo", "bare"))):
        for name in names:
            numbers[f"{section}.memory.{name}.peak_rss_mb"] = written[section]["memory"][name]["peak_rss_mb"]
    bad = {key: value for key, value in numbers.items() if not _positive_finite(value)}
    assert not bad, f"expected positive finite numbers, got {bad}"

    assert 0 < written["ddpo"]["reward_share"] < 1
    assert written["settings"]["repeats"] == len(written["sampling"]["ours"]["samples_s"])
    assert isinstance(written["sampling"]["passed"], bool) and isinstance(written["ddpo"]["passed"], bool)
    assert written["machine"]["torch"] and written["machine"]["platform"]
    assert written["machine"]["torch_threads"] == 1
    assert result["output"] == str(output)
    assert "sampling s/batch" in perf.format_table(result)
