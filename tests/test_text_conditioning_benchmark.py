"""The text-conditioning probe: its prompt edits, its ceiling, and a quick run that writes its JSON."""

import json

import numpy as np
import pytest
from diffalign.benchmarks import text_conditioning

from diffalign.shapes import detector
from diffalign.shapes.grammar import Facts, parse, scene_for
from diffalign.shapes.world import render


def test_edits_change_one_detail():
    prompt = "a red circle left of a blue square"
    assert text_conditioning.turned(prompt) == "a red circle above a blue square"
    assert text_conditioning.exchanged(prompt) == "a blue square left of a red circle"
    recoloured = parse(text_conditioning.recoloured(prompt))
    assert recoloured.entities[0].colour != "red" and recoloured.entities[0].shape == "circle"
    assert recoloured.entities[1:] == parse(prompt).entities[1:]


def test_ceiling_is_the_oracle_of_a_direction_blind_generator():
    prompts = ["a red circle left of a blue square", "two green squares", "a cyan square below a red circle"]
    # Independently: render a scene that is exactly right, and its mirror image (relation on the
    # same axis, wrong direction; circles and squares survive mirroring); a direction-blind
    # generator draws each with probability 1/2.
    rng = np.random.default_rng(0)
    expected = []
    for prompt in prompts:
        facts: Facts = parse(prompt)
        right = render(scene_for(facts, rng), 32)
        if not facts.relations:
            expected.append(detector.score(right, prompt))
            continue
        mirrored = np.ascontiguousarray(
            right[:, ::-1] if "left" in prompt or "right" in prompt else right[::-1]
        )
        expected.append((detector.score(right, prompt) + detector.score(mirrored, prompt)) / 2)
    assert text_conditioning.direction_blind_ceiling(prompts) == pytest.approx(np.mean(expected))
    assert text_conditioning.direction_blind_ceiling(prompts) == pytest.approx((2.5 / 3 + 1 + 2.5 / 3) / 3)


def test_quick_probe_writes_its_measurements(tmp_path):
    assert text_conditioning.main(["--quick", "--output", str(tmp_path), "--base", "2=0.801"]) == 0
    result = json.loads((tmp_path / "text_conditioning.json").read_text())
    distances = result["relative_distance"]["generator (shipped CLIP text tower)"]
    # the shipped generator's encoder barely separates a relation from its converse
    assert distances["converse relation"]["mean"] < 0.25 * distances["other colour"]["mean"]
    pairs = result["converse_same_noise"]
    assert 0 <= pairs["same_side"] <= pairs["detectable"] <= 8
    assert result["direction_blind_ceiling"]["2"]["headroom"] == pytest.approx(
        result["direction_blind_ceiling"]["2"]["ceiling"] - 0.801
    )
