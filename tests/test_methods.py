"""The method contract: methods register themselves, and what they declare drives the config."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import textwrap

import pytest
from test_reliability import TINY

from diffalign import optim
from diffalign.config import ConfigError, load_config


def test_the_shipped_methods_are_registered_with_their_sections_and_presets():
    assert set(optim.names()) == {"ddpo", "grpo", "dpok", "alignprop", "refl", "dpo"}
    assert [info.name for info in optim.available() if info.offline] == ["dpo"]
    config = load_config(None, [*TINY])
    for info in optim.available():
        assert info.description and info.cls.name == info.name
        assert isinstance(getattr(config, info.name), info.section)  # config.<name> is its section
        assert info.preset is None  # the shipped presets/<name>.yaml
        assert list(inspect.signature(info.cls.run_epoch).parameters) == ["self", "generator"]
    needs = {
        info.name: (info.needs_differentiable_reward, info.needs_stochastic_sampler, info.needs_lora)
        for info in optim.available()
    }
    assert needs == {
        "ddpo": (False, True, False),
        "grpo": (False, True, False),
        "dpok": (False, True, True),
        "alignprop": (True, False, False),
        "refl": (True, False, False),
        "dpo": (False, False, False),  # learns from preference pairs (its reference: the adapter off)
    }


def test_needs_are_checked_from_what_the_method_declares():
    with pytest.raises(ConfigError, match="Use method=ddpo or method=dpok or method=grpo for any reward"):
        load_config(None, [*TINY, "method=alignprop"])  # jpeg-compressibility is not differentiable
    with pytest.raises(ConfigError, match="sample.eta must be > 0 for grpo"):
        load_config(
            None,
            [
                *TINY,
                "method=grpo",
                "sample.images_per_prompt=2",
                "sample.stochastic_steps=[]",
                "sample.eta=0",
            ],
        )
    with pytest.raises(ConfigError, match="window for ddpo and grpo updates; dpok does not use it"):
        load_config(None, [*TINY, "method=dpok", "sample.stochastic_steps=[0, 1]"])
    with pytest.raises(ConfigError, match="unknown method 'grop'. Did you mean 'grpo'"):
        load_config(None, [*TINY, "method=grop"])


def test_config_loads_without_the_methods_or_torch():
    """The import cycle config <-> diffexp is gone, and config stays light: methods load when asked for."""
    script = (
        "import sys, diffalign.config; "
        "print(json.dumps([m for m in ('torch', 'diffalign.diffexp', 'diffalign.optim') if m in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", "import json; " + script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_the_method_in_the_optim_docstring_is_one_file_and_trains(tmp_path):
    """The example of diffalign/optim/__init__.py, written to a module of its own outside the
    package: importing it registers the method, its section becomes config keys, and it trains."""
    example = textwrap.dedent(re.search(r"::\n\n(.*?)\n\nand ``diffalign", optim.__doc__, re.DOTALL).group(1))
    (tmp_path / "last_step.py").write_text(example)
    run = tmp_path / "run"
    overrides = [
        *TINY,
        "method=last_step",
        "reward=clip-score",
        "reward_options={checkpoint: tiny-random}",
        "epochs=1",
        f"output_dir={run}",
    ]
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import last_step  # registers the method
        from diffalign.config import ConfigError, load_config
        from diffalign.train import train
        overrides = {overrides!r}
        try:
            load_config(None, [*overrides, "last_step.reward_scale=0"])
        except ConfigError as error:
            print(json.dumps(str(error)))
        config = load_config(None, overrides)
        train(config, progress=False)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "last_step.reward_scale must be positive" in result.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["epoch"] == 1 and records[-1]["truncation_steps"] == 1
    assert "reward_scale: 1.0" in (run / "config.yaml").read_text()  # its section is saved with the run
