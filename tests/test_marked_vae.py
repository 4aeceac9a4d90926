"""shapes-vae-marked: the shipped VAE fine-tuned to draw marked shapes, in the UNet's latent space."""

import json

import numpy as np
import pytest
import torch

from diffalign import pipeline as pipeline_module
from diffalign.cli import main
from diffalign.shapes import assets, marked_vae
from diffalign.shapes.identities import CATALOGUE, detect_identities, place_identities, render_identities


@pytest.fixture(scope="module")
def vaes():
    torch.manual_seed(0)
    return assets.load_pipeline().vae.float().eval(), assets.load_marked_vae()


def test_the_shipped_marked_vae_draws_markings_and_keeps_the_latent_space(vaes):
    base, marked = vaes
    before = marked_vae.measure(base, scenes=60)
    after = marked_vae.measure(marked, base, scenes=60)
    assert before["marked_exact"] < 0.3  # why it exists: the shipped VAE loses the markings
    assert after["marked_exact"] >= 0.7
    assert after["catalogue_exact"] >= 0.9  # the subjects MuDI personalises on
    assert after["plain_exact"] >= 0.95  # plain shapes still drawn right
    assert after["plain_latent_drift"] < 0.05  # and encoded where the UNet learned them
    assert marked.config.scaling_factor == base.config.scaling_factor


def test_a_catalogued_identity_survives_the_round_trip(vaes):
    _, marked = vaes
    looks = list(CATALOGUE.values())
    rng = np.random.default_rng(3)
    scenes = np.stack([render_identities(place_identities([look], rng)) for look in looks])
    back = marked_vae.round_trip(marked, scenes)
    read = [[d.identity for d in detect_identities(image, looks)] for image in back]
    assert sum(r == [look.name] for r, look in zip(read, looks, strict=True)) >= len(looks) - 1


def test_finetune_moves_the_weights_and_leaves_its_input_alone(vaes):
    base, _ = vaes
    decoder = base.decoder.conv_out.weight.detach().clone()
    config = marked_vae.MarkedVaeConfig(
        steps=3, batch_size=4, anchor_batch_size=2, pool_size=16, warmup_steps=1
    )
    tuned, losses = marked_vae.finetune(base, config, progress=False)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert torch.equal(base.decoder.conv_out.weight, decoder)  # a copy is trained
    assert not torch.equal(tuned.decoder.conv_out.weight, decoder)
    _, repeat = marked_vae.finetune(base, config, progress=False)
    assert repeat == losses  # seeded: the same scenes, noise and steps


def test_cli_writes_a_vae_the_pipeline_can_swap_in_and_refuses_an_existing_folder(tmp_path, capsys):
    output = tmp_path / "vae-run"
    options = ["--steps", "2", "--batch-size", "2", "--anchor-batch-size", "2", "--pool-size", "8"]
    code = main(["shapes", "train-vae-marked", "--output", str(output), *options, "--eval-scenes", "4"])
    assert code == 0
    report = json.loads((output / "training_report.json").read_text())
    assert set(report["after"]) == {"marked_exact", "plain_exact", "catalogue_exact", "plain_latent_drift"}
    assert report["config"]["steps"] == 2
    pipe = assets.load_pipeline()
    pipeline_module.swap_vae(pipe, str(output / "vae"), "shapes")
    assert pipe.vae.config.latent_channels == 4
    kept = sorted(p.name for p in output.rglob("*"))
    assert main(["shapes", "train-vae-marked", "--output", str(output), *options]) == 2
    assert sorted(p.name for p in output.rglob("*")) == kept  # nothing written over
    assert "vae-run" in capsys.readouterr().err
