import pytest

from diffalign.config import ConfigError, describe, load_config, parse_override


def test_layers_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\nsample:\n  num_steps: 7\n  guidance_scale: 4\n")
    config = load_config(path, ["ddpo.clip_range=2e-4", "sample.num_steps=9"])
    assert config.epochs == 3
    assert config.sample.num_steps == 9  # the command line wins over the file
    assert config.sample.guidance_scale == 4.0 and isinstance(config.sample.guidance_scale, float)
    assert config.ddpo.clip_range == pytest.approx(2e-4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ddpo.clip_rnage=1", "did you mean 'clip_range'"),
        ("smaple.num_steps=3", "did you mean 'sample'"),
        ("sample.num_steps=abc", "sample.num_steps must be int"),
        ("method=ddop", "did you mean 'ddpo'"),
        ("reward=jpeg-compressibilty", "did you mean 'jpeg-compressibility'"),
        ("prompts=simple-animal", "did you mean 'simple-animals'"),
        ("train.batch_size=5", "divisible by train.batch_size"),
        ("sample.images_per_prompt=5", "divisible by sample.images_per_prompt (5)"),
        ("dpok.buffer_epochs=0", "dpok.buffer_epochs must be at least 1"),
        ("method=alignprpo", "did you mean 'alignprop'"),
        ("sample.eta=0", "eta must be > 0"),
        ("train.learning_rate=.nan", "nan"),
        ("train.timestep_fraction=1.5", "timestep_fraction"),
        ("sample=3", "is a section"),
        ("mixed_precision=fp8", "mixed_precision must be one of"),
    ],
)
def test_bad_values_are_rejected_with_a_useful_message(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["method=ddpo", override])  # some rules (eta > 0) are policy-gradient rules
    assert message.lower() in str(error.value).lower()


def test_accumulation_must_divide_the_epoch():
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        load_config(
            None,
            [
                "sample.batch_size=4",
                "sample.num_batches_per_epoch=1",
                "train.batch_size=2",
                "train.gradient_accumulation_steps=3",
            ],
        )


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_override_syntax():
    assert parse_override("a.b=1") == {"a": {"b": 1}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("epochs")


def test_every_field_is_documented():
    rows = describe()
    assert {key for key, _, _ in rows} >= {"method", "sample.eta", "ddpo.clip_range", "train.learning_rate"}
    assert all(text for _, _, text in rows)


def test_the_default_job_applies_only_when_no_method_is_named(tmp_path, monkeypatch):
    from diffalign import config as config_module

    presets = {  # a default job other than the shipped one, to see the layers
        "default": {"method": "alignprop", "epochs": 7},
        "alignprop": {"method": "alignprop", "sample": {"images_per_prompt": 1}},
    }
    monkeypatch.setattr(config_module, "preset", lambda name: presets.get(name, {}))
    job = config_module.load_config(None, ["reward=aesthetic"])
    assert (job.method, job.epochs, job.sample.images_per_prompt) == ("alignprop", 7, 1)
    named = config_module.load_config(None, ["method=alignprop", "reward=aesthetic"])
    assert (named.method, named.epochs) == ("alignprop", config_module.TrainConfig.epochs)
    assert config_module.load_config(None, ["method=ddpo"]).epochs == config_module.TrainConfig.epochs
