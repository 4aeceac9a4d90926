"""The `diffalign` command as a user meets it."""

import subprocess
import sys

import pytest
import torch

from diffalign import images
from diffalign.cli import main


def test_train_help_lists_methods_rewards_prompt_sets_and_keys(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for expected in (
        "ddpo",
        "jpeg-compressibility",
        "pickscore",
        "simple-animals",
        "ddpo.clip_range",
        "--resume",
    ):
        assert expected in text


def test_rewards_listing(capsys):
    assert main(["rewards"]) == 0
    text = capsys.readouterr().out
    assert "aesthetic" in text and "differentiable" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--set", "reward=pickscor"], "did you mean 'pickscore'"),
        (["train", "--set", "sample.stepz=3"], "unknown config key 'sample.stepz'"),
        (
            [
                "train",
                "--set",
                "model=/no/such/folder",
                "--set",
                "eval.prompt_sets=[]",
                "--output-dir",
                "{tmp}/r",
            ],
            "does not exist",
        ),
        (["train", "--set", "model=/models/sd15"], "eval.prompt_sets"),
        (["score", "--reward", "jpeg", "--images", "{tmp}"], "unknown reward"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_code_2(argv, message, capsys, tmp_path):
    argv = [part.replace("{tmp}", str(tmp_path)) for part in argv]
    assert main(argv) == 2
    assert message.lower() in capsys.readouterr().err.lower()


def test_sample_then_score_a_folder(tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["sample", "--prompt", "a cat", "-n", "3", "--steps", "3", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["0000.png", "0001.png", "0002.png", "grid.png"]
    (out / "grid.png").unlink()
    csv_path = tmp_path / "scores.csv"
    assert main(["score", "--reward", "jpeg-compressibility", "--images", str(out), "-o", str(csv_path)]) == 0
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "image,prompt,jpeg-compressibility" and len(rows) == 4
    # The CSV holds exactly what the reward gives for the saved PNG.
    from diffalign import rewards

    expected = rewards.build("jpeg-compressibility")(images.load_image(out / "0000.png")[None], [""]).item()
    assert float(rows[1].split(",")[-1]) == pytest.approx(expected)


def test_corrupt_image_is_named(tmp_path, capsys):
    images.save_image(torch.rand(3, 8, 8), tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    assert main(["score", "--reward", "jpeg-compressibility", "--images", str(tmp_path)]) == 2
    assert "bad.png" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "diffalign.cli", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "train" in result.stdout


def test_train_ends_with_a_before_after_summary_read_from_its_metrics(tmp_path, capsys):
    """The last lines of `diffalign train`: each evaluated metric from the base model's record to
    the last evaluation (numbers as in metrics.jsonl), the time, and where grids and curves are."""
    import json

    from test_reliability import train_args

    run = tmp_path / "run"
    assert main(train_args(run, "epochs=2", "eval.every=1")) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    key = "eval/simple-animals/jpeg-compressibility"
    before, after = records[0][key], records[-1][key]
    assert "before -> after (epoch 0 -> 2" in out
    line = next(line for line in out.splitlines() if key in line)
    assert f"{before:.3f} -> {after:.3f} ({after - before:+.3f})" in line and line.endswith(
        "(training reward)"
    )
    assert "time: " in out and str(run / "samples") in out and str(run / "reward_curve.png") in out
    assert (run / "samples" / "epoch-0002.png").is_file() and (run / "reward_curve.png").is_file()


@pytest.mark.parametrize("argv", [["--help"], ["rewards"], ["train", "--help"]])
def test_listing_commands_import_no_torch_and_no_study(argv):
    """The command tree is built without importing commands' modules: help and listings stay fast
    (benchmarks/cli_startup.py measures it)."""
    script = (
        "import sys\n"
        "from diffalign.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('LOADED', sorted(m for m in ('torch', 'scipy', 'matplotlib', 'open_clip', 'diffalign.benchmarks') "
        "if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.strip().splitlines()[-1]
    if argv[0] == "train":  # lists the methods and their config keys: torch code (and diffusers' scipy)
        assert "open_clip" not in loaded and "matplotlib" not in loaded and "benchmarks" not in loaded
    else:
        assert loaded == "LOADED []"


def test_python_dash_m_diffalign_runs_the_command():
    result = subprocess.run(
        [sys.executable, "-m", "diffalign", "rewards"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "shapes-oracle" in result.stdout
