"""The ShapesWorld protection benchmark: its scenes, masks and prompts, its metrics, and a quick run."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffalign.benchmarks import protection

from diffalign import cli
from diffalign.inpainting import load_inpainting
from diffalign.shapes import detect, parse, render, scene_for, score
from diffalign.shapes.splits import prompts as split_prompts
from diffalign.shapes.world import Scene


@pytest.fixture(scope="module")
def cases():
    return protection.make_cases(12, seed=3)


def test_cases_keep_one_object_and_ask_for_another_second_object(cases):
    train = set(split_prompts("train", "relation"))
    for case in cases:
        original, edit = parse(case.prompt), parse(case.edit_prompt)
        assert score(case.image, case.prompt) == 1.0
        assert edit.relations == original.relations
        kept = [i for i in range(2) if edit.entities[i] == original.entities[i]]
        assert len(kept) == 1, (case.prompt, case.edit_prompt)
        assert case.edit_prompt in train
        # the defender's mask covers exactly one detected object, with a 1 px rim
        seen = case.masks["seen"][0].bool().numpy()
        inside = [d for d in detect(case.image) if seen[int(d.y * 32), int(d.x * 32)]]
        assert len(inside) == 1
        assert (inside[0].colour, inside[0].shape) == (
            edit.entities[kept[0]].colour,
            edit.entities[kept[0]].shape,
        )
        assert (case.kept.colour, case.kept.shape) == (inside[0].colour, inside[0].shape)


def _pixels(scene: Scene) -> torch.Tensor:
    return (
        torch.from_numpy(np.array(render(scene))).permute(2, 0, 1) / 255
    )  # a copy: renders are cached, read-only


def test_kept_in_place_needs_the_same_object_where_it_was(cases):
    for case in cases:
        assert protection.kept_in_place(case.image, case.kept)
        alone = Scene((case.kept,))
        assert protection.kept_in_place(_pixels(alone), case.kept)
        # 3 px away (beyond the ~2 px tolerance) or in another colour it is no longer kept in place
        step = 3 / 32 if case.kept.x < 0.5 else -3 / 32
        moved = Scene((replace(case.kept, x=case.kept.x + step),))
        assert not protection.kept_in_place(_pixels(moved), case.kept)
        colour = "red" if case.kept.colour != "red" else "blue"
        recoloured = Scene((replace(case.kept, colour=colour),))
        assert not protection.kept_in_place(_pixels(recoloured), case.kept)


def test_editor_input_change_is_zero_for_the_original_and_grows_with_the_perturbation(cases):
    pipe = load_inpainting("shapes-inpaint")
    few = cases[:2]
    unchanged = protection.editor_input_change(pipe, few, [c.image for c in few], timestep=951, noises=2)
    assert unchanged == {"latent_shift": 0.0, "noise_norm_gain": 0.0, "noise_change": 0.0}
    generator = torch.Generator().manual_seed(0)
    shifts = []
    for budget in (4 / 255, 32 / 255):
        noisy = [
            (
                c.image
                + budget * torch.sign(torch.randn(c.image.shape, generator=generator)) * c.masks["seen"]
            ).clamp(0, 1)
            for c in few
        ]
        shifts.append(
            protection.editor_input_change(pipe, few, noisy, timestep=951, noises=2)["latent_shift"]
        )
    assert 0 < shifts[0] < shifts[1] < 1, shifts


def test_unseen_masks_are_drawn_differently_from_the_defenders(cases):
    for case in cases:
        seen = case.masks["seen"].bool()
        protected_object = seen & (case.image.max(0).values > case.image.min(0).values)  # coloured pixels
        for name in protection.UNSEEN:
            unseen = case.masks[name].bool()
            assert not torch.equal(unseen, seen)
            kept = (unseen & protected_object).sum() / protected_object.sum()
            assert kept > 0.8, f"{name} keeps only {kept:.0%} of the protected object"


def test_box_mask_is_the_grown_bounding_box():
    region = np.zeros((10, 12), dtype=bool)
    region[3:5, 4:8] = True
    region[5, 6] = True
    box = protection.box_mask(region, 2)
    expected = np.zeros_like(region)
    expected[1:8, 2:10] = True
    assert np.array_equal(box, expected)
    assert protection.box_mask(region, 20).all()


def test_lasso_surrounds_a_disc_but_is_no_disc():
    yy, xx = np.mgrid[:32, :32]
    disc = (yy - 15.5) ** 2 + (xx - 15.5) ** 2 <= 5**2
    lasso = protection.lasso_mask(disc, np.random.default_rng(0))
    assert (lasso & disc).sum() / disc.sum() > 0.9
    assert lasso.sum() > disc.sum() and lasso[0].sum() == 0 and lasso[:, 0].sum() == 0


def test_psnr_matches_the_formula():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.full((2, 3, 4, 4), 0.1)
    assert protection.psnr(a, b) == pytest.approx(20.0, abs=1e-4)  # 10·log10(1/0.01)
    b[1] = 0.01  # per-image PSNR, then the mean: (20 + 40) / 2
    assert protection.psnr(a, b) == pytest.approx(30.0, abs=1e-4)


def test_jpeg_round_trip_is_close_but_not_identical(cases):
    image = cases[0].image
    compressed = protection.jpeg(image, 75)
    assert compressed.shape == image.shape
    assert 25 < protection.psnr(compressed, image) < 60


def test_directional_similarity_prefers_the_requested_change(cases):
    directional = protection.DirectionalSimilarity()
    rng = np.random.default_rng(0)
    as_tensor = lambda array: torch.from_numpy(np.array(array)).permute(2, 0, 1).float() / 255
    to_target = torch.stack([as_tensor(render(scene_for(c.edit_prompt, rng), 32)) for c in cases])
    unchanged_meaning = torch.stack([as_tensor(render(scene_for(c.prompt, rng), 32)) for c in cases])
    toward = directional(to_target[None], cases)
    sideways = directional(unchanged_meaning[None], cases)
    assert toward > sideways + 0.1, (toward, sideways)


@pytest.mark.slow
def test_quick_benchmark_writes_table_json_and_figures(tmp_path, capsys):
    output = tmp_path / "protection.json"
    cli.main(["bench", "protection", "--quick", "-o", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    assert "diffusionguard" in printed and "unprotected" in printed
    result = json.loads(output.read_text("utf-8"))
    (budget,) = result["budgets"]
    for method, entry in result["budgets"][budget].items():
        cost = entry["cost"]
        assert cost["linf_255"] <= 8 + 1e-3
        assert math.isfinite(cost["psnr_vs_original"]) and cost["psnr_vs_original"] > 30
        assert cost["unet_passes"] == (0 if method == "photoguard" else 3)
        assert set(entry["conditions"]) == {*protection.CONDITIONS, "unseen"}
        for metrics in entry["conditions"].values():
            assert 0 <= metrics["success"] <= 1 and 0 <= metrics["oracle"] <= 1
            assert metrics["faithful"] <= min(metrics["success"], metrics["kept"]) + 1e-9
        assert entry["editor_input"]["latent_shift"] > 0
    assert set(result["conditioning_leverage"]) == {"951", "751", "501", "251"}
    leverage = result["conditioning_leverage"]
    assert all(0 < value["measured"] < 1 for value in leverage.values())
    # a perfect reader's dependence grows as the noise level falls: √(ᾱ/(1−ᾱ)) rises with ᾱ
    assert leverage["951"]["exact_reader"] < leverage["751"]["exact_reader"] < leverage["501"]["exact_reader"]
    assert (tmp_path / "protection.png").stat().st_size > 0
    assert (tmp_path / "protection_examples.png").stat().st_size > 0


def test_command_line_settings():
    import argparse

    parser = argparse.ArgumentParser()
    protection.add_arguments(parser)
    settings = protection.settings_from(
        parser.parse_args(
            ["--budgets", "4", "16", "--methods", "diffusionguard", "--guard-editor-steps", "4"]
        )
    )
    assert settings.budgets == pytest.approx([4 / 255, 16 / 255])
    assert settings.methods == ["diffusionguard"] and settings.guard_editor_steps == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["--methods", "glaze"])
