"""shapes-prefs: the built-in ShapesWorld preference set (Pick-a-Pic's columns plus ground truth)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffalign import registry
from diffalign.shapes import PromptOutsideGrammar, parse, prefs

PICKAPIC = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


def _rows(folder) -> list[dict]:
    rows = []
    for shard in sorted(folder.glob("*.parquet")):
        rows += pq.read_table(shard).to_pylist()
    return rows


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One small build shared by the tests that only read it (generation is the slow part)."""
    return prefs.build(tmp_path_factory.mktemp("prefs") / "set", pairs=48, seed=3, progress=False)


def test_small_build_has_pickapic_columns_and_consistent_figures(small):
    rows = _rows(small)
    report = prefs.read_recipe(small)
    assert len(rows) == 48 == report["figures"]["pairs"] == report["recipe"]["pairs"]
    for row in rows:
        assert set(PICKAPIC) <= set(row)
        assert (row["label_0"], row["label_1"]) in {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}
        image = Image.open(io.BytesIO(row["jpg_0"]))
        assert image.format == "PNG" and image.size == (32, 32) and image.mode == "RGB"
        assert row["prompt_kind"] in prefs.PROMPT_KINDS
    # The headline figure, recomputed here from the ground-truth columns alone.
    well = [r for r in rows if r["prompt_kind"] in ("train", "near-duplicate") and r["label_0"] != 0.5]
    won = [
        (r["oracle_0"], r["oracle_1"]) if r["label_0"] == 1.0 else (r["oracle_1"], r["oracle_0"])
        for r in well
    ]
    better = sum(w > lo for w, lo in won) / len(won)
    expected = report["figures"]["winner_by_oracle_well_formed"]
    assert expected["pairs"] == len(well)
    assert expected["better"] == pytest.approx(better, abs=1e-4)
    # Ties are exactly the pairs whose utilities the annotator could not tell apart.
    ties = sum(r["label_0"] == 0.5 for r in rows) / len(rows)
    assert report["figures"]["tie_rate"] == pytest.approx(ties, abs=1e-4)
    assert "ties" in prefs.describe(report["figures"])


def test_prompt_kinds_mean_what_they_say(small):
    rows = _rows(small)
    kinds = {r["prompt_kind"] for r in rows}
    assert "train" in kinds and kinds & set(prefs.BROKEN_KINDS), kinds
    for row in rows:
        source = parse(row["prompt_source"])
        if row["prompt_kind"] in prefs.BROKEN_KINDS:
            with pytest.raises(PromptOutsideGrammar):
                parse(row["caption"])
            assert math.isnan(row["oracle_0"]) and math.isnan(row["oracle_1"])
        else:
            assert parse(row["caption"]).canonical() == source.canonical()
            assert (row["caption"] == row["prompt_source"]) == (row["prompt_kind"] == "train")
            assert 0.0 <= row["oracle_0"] <= 1.0 and 0.0 <= row["quality_0"] <= 1.0


def test_every_source_prompt_yields_rewordings_and_broken_versions():
    from diffalign.shapes.splits import prompts

    rng = np.random.default_rng(0)
    for prompt in [*prompts("train", "single")[:3], *prompts("train", "count")[:3], *prompts("train")[-5:]]:
        rewordings = prefs._rewordings(prompt, rng)
        assert rewordings and prompt not in rewordings
        assert all(parse(r).canonical() == parse(prompt).canonical() for r in rewordings)
        for _ in range(10):
            broken, kind = prefs._broken(prompt, rng)
            assert kind in prefs.BROKEN_KINDS
            with pytest.raises(PromptOutsideGrammar):
                parse(broken)


def test_same_seed_same_bytes(small, tmp_path):
    again = prefs.build(tmp_path / "again", pairs=48, seed=3, progress=False)
    shards = sorted(p.name for p in small.glob("*"))
    assert shards == sorted(p.name for p in again.glob("*"))
    for name in shards:
        assert (small / name).read_bytes() == (again / name).read_bytes(), name


def test_build_refuses_to_overwrite(small):
    with pytest.raises(FileExistsError, match="already holds files"):
        prefs.build(small, pairs=4, progress=False)


def test_cached_path_builds_once_into_the_xdg_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DIFFALIGN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(prefs, "DEFAULT_PAIRS", 6)
    calls = []
    real_build = prefs.build

    def counting_build(*args, **kwargs):
        calls.append(kwargs)
        return real_build(*args, **kwargs, progress=False)

    monkeypatch.setattr(prefs, "build", counting_build)
    folder = prefs.cached_path()
    assert folder == tmp_path / "diffalign" / prefs.NAME
    assert json.loads((folder / "recipe.json").read_text())["figures"]["pairs"] == 6
    assert "generating" in capsys.readouterr().out
    # The registry resolves the name to the same folder, without building again.
    assert registry.PREFERENCE_SETS.get("shapes-prefs").path() == folder
    assert prefs.cached_path() == folder
    assert len(calls) == 1
    assert "generating" not in capsys.readouterr().out


def test_registry_knows_shapes_prefs():
    entry = registry.PREFERENCE_SETS.get("shapes-prefs")
    assert entry is not None and entry.world == "ShapesWorld"
    assert entry.fits("shapes") and not entry.fits("some/other-model")


def test_a_flow_model_build_pairs_its_own_images_of_the_same_prompts(small, tmp_path):
    flow = prefs.build(tmp_path / "flow", pairs=48, seed=3, model="shapes-flow", progress=False)
    assert prefs.read_recipe(flow)["recipe"]["model"] == "shapes-flow"
    ours, theirs = _rows(flow), _rows(small)
    assert [row["caption"] for row in ours] == [row["caption"] for row in theirs]  # the recipe's prompts
    differing = sum(row["jpg_0"] != other["jpg_0"] for row, other in zip(ours, theirs))
    assert differing > 40  # another model drew them
    for row in ours:  # and the oracle labels them: a well-formed caption has a truth value, a broken one none
        well_formed = row["prompt_kind"] in ("train", "near-duplicate")
        assert (0.0 <= row["oracle_0"] <= 1.0) if well_formed else math.isnan(row["oracle_0"])


def test_a_build_for_a_model_outside_shapesworld_is_refused(tmp_path):
    with pytest.raises(prefs.PreferenceDataError, match="does not draw ShapesWorld.*shapes-flow"):
        prefs.build(tmp_path / "x", pairs=4, model="stable-diffusion-v1-5", progress=False)
    assert not (tmp_path / "x").exists()
