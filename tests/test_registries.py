"""Worlds join diffalign through registries: a toy world registered from tests/ trains like a built-in one,
and an installed package's provider is found through its entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import toyworld

from diffalign import pipeline, prompts, registry
from diffalign.config import ConfigError, load_config
from diffalign.train import train

TOY = [
    "method=alignprop",
    f"model={toyworld.PIPELINE}",
    f"reward={toyworld.REWARD}",
    f"prompts={toyworld.PROMPT_SET}",
    f"eval.prompt_sets=[{toyworld.PROMPT_SET}]",
    "eval.rewards=[]",
    "eval.size=4",
    "eval.grid_size=4",
    "exploration=none",
    "epochs=1",
    "sample.num_steps=3",
    "sample.batch_size=4",
    "sample.images_per_prompt=2",
    "sample.num_batches_per_epoch=1",
    "train.batch_size=4",
    "alignprop.truncation_steps=1",
    "tensorboard=false",
]


def test_a_toy_world_registered_from_outside_trains_one_epoch(tmp_path):
    config = load_config(None, [*TOY, f"output_dir={tmp_path / 'run'}"])
    result = train(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [0, 1]
    key = f"eval/{toyworld.PROMPT_SET}/{toyworld.REWARD}"
    assert key in records[0] and key in records[1]  # the toy prompts, scored by the toy reward
    assert records[1]["samples"] == 4 and -1 <= records[1]["reward_mean"] <= 1
    assert (result.lora_dir / "pytorch_lora_weights.safetensors").is_file()
    image = pipeline.load(toyworld.PIPELINE)(
        toyworld.COLOURS[0], num_inference_steps=2, output_type="pt"
    ).images
    assert image.shape == (1, 3, 16, 16)  # the toy loader's own pipeline, not a built-in one


def test_the_prompt_sets_model_rule_travels_with_the_set():
    assert toyworld.PROMPT_SET in prompts.builtin_names()
    with pytest.raises(
        ConfigError, match=r"toy-world prompts \(for models toy-pipe\) but model is 'tiny-random'"
    ):
        load_config(None, [*TOY, "model=tiny-random"])
    with pytest.raises(ConfigError, match="ShapesWorld prompts"):  # the built-in world's sets carry theirs
        load_config(None, [*TOY, "eval.prompt_sets=[shapes-train]"])
    load_config(
        None, [*TOY, "model=tiny-random", "eval.prompt_sets=[]"]
    )  # training prompts are the user's call


def test_names_are_registered_once_and_misspellings_are_suggested():
    with pytest.raises(registry.RegistryError, match="registered twice"):
        pipeline.register(toyworld.PIPELINE, toyworld.load_toy_pipeline)
    with pytest.raises(pipeline.PipelineError, match="Did you mean 'toy-pipe'"):
        pipeline.check_spec("toy-pip")
    with pytest.raises(prompts.PromptSetError, match="Did you mean 'toy-colours'"):
        prompts.load_prompts("toy-colour")


def test_an_installed_packages_provider_is_found_through_its_entry_point(tmp_path):
    """A package declaring ``[diffalign.providers]`` needs no import by the user: the first look-up of
    a name the registry does not hold imports it (here a dist-info folder on the path, as pip writes it)."""
    (tmp_path / "pondworld.py").write_text(
        textwrap.dedent("""
        from diffalign import prompts
        prompts.register("pond-frogs", lambda: ["a green frog", "two green frogs"], world="pond")
    """)
    )
    info = tmp_path / "pondworld-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pondworld\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[diffalign.providers]\npond = pondworld\n")
    script = "from diffalign import prompts; print(prompts.load_prompts('pond-frogs'))"
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['a green frog', 'two green frogs']"


def test_shapesworld_subject_sets_register_without_torch():
    """Listing subject sets (``diffalign personalize --help``) imports ShapesWorld's registrations only."""
    script = (
        "import sys; from diffalign import registry; names = registry.SUBJECT_SETS.names(); "
        "print(names[0], len(names), 'torch' in sys.modules, 'numpy' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["shapes-similar-1", "6", "False", "False"]
    entry = registry.SUBJECT_SETS.get("shapes-dissimilar-3")
    assert entry.world == "ShapesWorld" and entry.fits("shapes") and not entry.fits("some/other-model")
