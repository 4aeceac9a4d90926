"""The FiFA + Diffusion-DPO study runs end to end in quick mode on a tiny preference set."""

import json

import numpy as np
import pytest
from diffalign.benchmarks import fifa_dpo
from PIL import Image

from diffalign.shapes import caption, random_scene, render


def shapes_pairs(folder, count=12):
    """Pairs whose winner is a rendered scene (its true caption) and loser a blank canvas; the first
    two prompts are truncated, as broken prompts in real data are."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.new("RGB", (32, 32), "white").save(folder / "blank.png")
    lines = []
    for index in range(count):
        scene = random_scene(rng, n_objects=1 + index % 2)
        Image.fromarray(render(scene)).save(folder / f"{index}.png")
        prompt = caption(scene, rng)
        if index < 2:
            prompt = prompt[: len(prompt) // 2]
        lines.append(json.dumps({"prompt": prompt, "chosen": f"{index}.png", "rejected": "blank.png"}))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_steps_to_match_is_the_first_evaluation_at_the_target():
    assert fifa_dpo.steps_to_match([0.0, 0.01, 0.03, 0.02], [0, 16, 32, 48], 0.025) == 32
    assert fifa_dpo.steps_to_match([0.0, 0.01], [0, 16], 0.025) is None


@pytest.mark.slow
def test_quick_study_writes_subsets_json_plot_and_table(tmp_path, capsys):
    data = shapes_pairs(tmp_path / "data")
    output = tmp_path / "study"
    fifa_dpo.main(
        [
            "--quick",
            "--jobs",
            "1",
            "--data",
            str(data),
            "--reward",
            "shapes-clip",
            "--text-quality",
            "shapes-grammar",
            "--fraction",
            "0.5",
            "--set",
            "model=tiny-random",
            "--set",
            "eval.size=4",
            "--set",
            "sample.num_steps=2",
            "--set",
            "train.batch_size=2",
            "--output",
            str(output),
        ]
    )
    result = json.loads((output / "fifa_dpo.json").read_text())
    assert set(result["summary"]["variants"]) == {"all", "fifa"}
    assert result["subsets"]["fifa"]["kept"] == 6
    kept = [
        json.loads(line)["prompt"] for line in (output / "subsets" / "fifa.jsonl").read_text().splitlines()
    ]
    broken = [
        json.loads(line)["prompt"] for line in (tmp_path / "data" / "pairs.jsonl").read_text().splitlines()
    ][:2]
    assert not set(broken) & set(kept)  # the broken prompts were filtered out
    for entry in result["summary"]["variants"].values():
        assert entry["evaluations"] == 3  # the base and two evaluations along the run
        assert fifa_dpo.TRAIN_ORACLE in entry["final_change"]
    assert (output / "fifa_dpo.png").is_file()
    assert "| fifa | 6 |" in capsys.readouterr().out
    # The summary can be made again from the saved runs, elsewhere; never over its own input.
    again = tmp_path / "again"
    assert fifa_dpo.main(["--from-json", str(output / "fifa_dpo.json"), "--output", str(again)]) == 0
    assert json.loads((again / "fifa_dpo.json").read_text())["summary"]["variants"].keys() == {"all", "fifa"}
    before = (output / "fifa_dpo.json").read_bytes()
    with pytest.raises(SystemExit):
        fifa_dpo.main(["--from-json", str(output / "fifa_dpo.json"), "--output", str(output)])
    assert (output / "fifa_dpo.json").read_bytes() == before
