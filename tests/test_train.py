"""The training loop end to end on tiny-random: resumption, failure handling, outputs."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffalign import checkpoint, rewards
from diffalign.config import load_config
from diffalign.train import RunExistsError, train

TINY = [
    "method=ddpo",
    "model=tiny-random",
    "reward=jpeg-compressibility",
    "prompts=simple-animals",
    "eval.prompt_sets=[]",
    "eval.rewards=[]",
    "eval.size=4",
    "sample.num_steps=4",
    "sample.batch_size=4",
    "sample.num_batches_per_epoch=1",
    "train.batch_size=2",
    "train.learning_rate=1e-2",
    "ddpo.clip_range=1e-2",
    "eval.every=2",
    "tensorboard=false",
]
COMPARED = ("reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "ratio", "samples_seen")


def _config(tmp_path, name, *extra):
    return load_config(None, [*TINY, f"output_dir={tmp_path / name}", *extra])


class FailingReward:
    """JPEG compressibility that turns NaN on its ``fail_at``-th call: a reward model going bad mid-run."""

    name = "flaky"
    differentiable = False

    def __init__(self, fail_at: int | None):
        self.inner = rewards.build("jpeg-compressibility")
        self.calls = 0
        self.fail_at = fail_at

    def __call__(self, images, prompts):
        self.calls += 1
        scores = self.inner(images, prompts)
        if self.calls == self.fail_at:
            scores[1] = float("nan")
        return scores


def test_resumed_run_matches_uninterrupted_run(tmp_path):
    full = train(_config(tmp_path, "full", "epochs=3"), progress=False)

    # Calls: 1 = grid at epoch 0, 2 = epoch 1, 3 = epoch 2, 4 = grid at epoch 2, 5 = epoch 3 -> NaN.
    interrupted = _config(tmp_path, "cut", "epochs=3")
    with pytest.raises(rewards.RewardError, match="non-finite"):
        train(interrupted, reward=FailingReward(fail_at=5), progress=False)
    saved = checkpoint.latest(tmp_path / "cut" / "checkpoints")
    assert saved is not None and saved.name == "epoch-0002"  # the last good checkpoint is intact
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]

    resumed = train(interrupted, resume=True, progress=False)
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3]
    for ours, reference in zip(resumed.history[1:], full.history[1:]):
        for key in COMPARED:
            assert ours[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-9), key
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "extra",
    [
        ("method=dpok", "dpok.buffer_epochs=2", "dpok.updates_per_epoch=2", "dpok.value_updates_per_epoch=2"),
        (
            "method=alignprop",
            "reward=aesthetic",
            "reward_options={checkpoint: tiny-random}",
            "exploration=diffexp",
        ),
        (
            "method=refl",
            "reward=aesthetic",
            "reward_options={checkpoint: tiny-random}",
            "refl.first_step=0",
            "refl.last_step=3",
        ),
    ],
    ids=["dpok", "alignprop+diffexp", "refl"],
)
def test_resuming_other_methods_matches_an_uninterrupted_run(tmp_path, extra):
    """DPOK's value network and replay buffer, and DiffExp's draws, survive a checkpoint exactly."""
    full = train(_config(tmp_path, "full", "epochs=3", *extra), progress=False)
    train(_config(tmp_path, "cut", "epochs=2", *extra), progress=False)
    resumed = train(_config(tmp_path, "cut", "epochs=3", *extra), resume=True, progress=False)
    keys = [key for key in full.history[-1] if not key.endswith("seconds") and not key.startswith("eval/")]
    for key in keys:
        assert resumed.history[-1][key] == pytest.approx(full.history[-1][key], rel=1e-6, abs=1e-9), key
    weights = [load_file(run.lora_dir / "pytorch_lora_weights.safetensors") for run in (full, resumed)]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_existing_run_is_not_overwritten_and_resume_needs_a_checkpoint(tmp_path):
    config = _config(tmp_path, "run", "epochs=1")
    train(config, progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(RunExistsError, match="--resume"):
        train(config, progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        train(_config(tmp_path, "fresh", "epochs=1"), resume=True, progress=False)


def test_outputs_a_person_can_look_at(tmp_path):
    result = train(_config(tmp_path, "run", "epochs=2"), progress=False)
    out = result.output_dir
    for name in (
        "samples/epoch-0000.png",
        "samples/epoch-0002.png",
        "reward_curve.png",
        "config.yaml",
        "lora/pytorch_lora_weights.safetensors",
    ):
        assert (out / name).is_file(), name
    record = result.history[-1]
    for key in (
        "reward_mean",
        "reward_std",
        "approx_kl",
        "clipfrac",
        "loss",
        "seconds",
        "eval/simple-animals/jpeg-compressibility",
    ):
        assert key in record


def test_wrong_shape_reward_stops_before_any_update(tmp_path):
    class Scalar:
        name, differentiable = "scalar", False

        def __call__(self, images, prompts):
            return torch.tensor(1.0)

    with pytest.raises(rewards.RewardError, match="expected a tensor of shape"):
        train(_config(tmp_path, "run", "epochs=1"), reward=Scalar(), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("method=dpok",),
        ("method=alignprop", "reward=aesthetic", "reward_options={checkpoint: tiny-random}"),
    ],
    ids=["ddpo", "dpok", "alignprop"],
)
def test_two_processes_gather_rewards_and_write_one_run(tmp_path, extra):
    """`torchrun --nproc_per_node 2` on CPU: accelerate's gloo backend, one set of outputs."""
    import subprocess
    import sys

    out = tmp_path / "mp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "diffalign.cli",
        "train",
        "--no-progress",
        *[arg for item in (*TINY, *extra) for arg in ("--set", item)],
        "--set",
        "epochs=1",
        "--output-dir",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("done: epoch 1") == 1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert lines[1]["samples"] == 2 * 4  # both processes' samples were gathered
