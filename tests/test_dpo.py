"""Diffusion-DPO (method: dpo): the loss, the reference, the shared noise, learning and resumption."""

import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffalign import pipeline
from diffalign.config import ConfigError, load_config
from diffalign.families import Conditioning
from diffalign.optim.dpo import DPO, dpo_loss, epoch_order, pixels
from diffalign.optim.dpok import adapter_disabled
from diffalign.train import build_context, train

TINY = [
    "method=dpo",
    "model=tiny-random",
    "reward=jpeg-compressibility",
    "prompts=simple-animals",
    "eval.prompt_sets=[]",
    "eval.rewards=[]",
    "eval.size=4",
    "eval.every=2",
    "sample.num_steps=4",
    "train.batch_size=4",
    "dpo.pairs_per_epoch=8",
    "tensorboard=false",
]


def separable_pairs(folder, count=8, size=32):
    """A JSONL preference set anyone could learn: the chosen image is red, the rejected one blue."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (220, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (size, size), (30, 30, 220)).save(folder / "blue.png")
    lines = [
        json.dumps({"prompt": f"a red picture number {index}", "chosen": "red.png", "rejected": "blue.png"})
        for index in range(count)
    ]
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(tmp_path, name, *extra):
    data = separable_pairs(tmp_path / "data")
    return load_config(None, [*TINY, f"data={data}", f"output_dir={tmp_path / name}", *extra])


def test_loss_matches_an_independent_computation():
    model_w = torch.tensor([0.10, 0.20, 0.30])
    model_l = torch.tensor([0.40, 0.10, 0.30])
    ref_w = torch.tensor([0.12, 0.18, 0.31])
    ref_l = torch.tensor([0.38, 0.11, 0.29])
    beta = 50.0
    terms = dpo_loss(model_w, model_l, ref_w, ref_l, beta)
    expected_logits, expected_losses = [], []
    for mw, ml, rw, rl in zip(model_w.tolist(), model_l.tolist(), ref_w.tolist(), ref_l.tolist()):
        logit = -beta / 2 * ((mw - rw) - (ml - rl))
        expected_logits.append(logit)
        expected_losses.append(math.log1p(math.exp(-logit)))  # -log sigmoid(logit)
    assert terms.logit.tolist() == pytest.approx(expected_logits, rel=1e-5)
    assert terms.loss.item() == pytest.approx(sum(expected_losses) / 3, rel=1e-5)
    metrics = terms.metrics()
    assert metrics["implicit_accuracy"].item() == pytest.approx(
        2 / 3
    )  # pair 1: winner better, pair 2 worse...
    assert metrics["chosen_error_vs_ref"].item() == pytest.approx(((-0.02) + 0.02 + (-0.01)) / 3, abs=1e-7)
    assert metrics["rejected_error_vs_ref"].item() == pytest.approx((0.02 - 0.01 + 0.01) / 3, abs=1e-7)
    # The model equal to the reference: the loss is log 2 whatever the errors are.
    same = dpo_loss(model_w, model_l, model_w, model_l, beta)
    assert same.loss.item() == pytest.approx(math.log(2))


def test_reference_is_the_base_unet_with_the_adapter_off(tmp_path):
    config = _config(tmp_path, "ref")
    context = build_context(config)
    method = DPO(context, config)
    unet = context.pipe.unet
    with torch.no_grad():  # move the adapter away from its zero start so that it changes predictions
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    base = pipeline.load("tiny-random", seed=config.seed).unet  # the same weights, never adapted
    noisy = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    timesteps = torch.tensor([10, 500])
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        reference = method.reference(noisy, timesteps, Conditioning(embeds, torch.zeros_like(embeds)))
        expected = base(noisy, timesteps, encoder_hidden_states=embeds).sample
        adapted = unet(noisy, timesteps, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-6)
    assert (adapted - expected).abs().max() > 1e-3  # the adapter is really on outside the reference
    with adapter_disabled(unet):
        pass
    assert unet.active_adapters()  # switched back on


def test_winner_and_loser_share_noise_and_timestep(tmp_path):
    """With identical winner and loser latents, shared noise and timestep make the two errors equal
    for any weights, so the logit is exactly 0 and the loss log 2; independent draws would not."""
    config = _config(tmp_path, "shared")
    context = build_context(config)
    method = DPO(context, config)
    with torch.no_grad():
        for name, parameter in context.pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    unet = context.pipe.unet
    latents = torch.randn(4, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    embeds = torch.randn(4, 77, unet.config.cross_attention_dim)
    embeds = Conditioning(embeds, torch.zeros_like(embeds))
    terms = method.loss_on_latents(latents, latents.clone(), embeds, torch.Generator().manual_seed(0))
    assert terms.logit.abs().max().item() == 0.0
    assert terms.loss.item() == pytest.approx(math.log(2))
    other = method.loss_on_latents(latents, latents + 0.5, embeds, torch.Generator().manual_seed(0))
    assert other.logit.abs().max().item() > 0  # and a real difference does register


def test_full_fine_tune_keeps_a_frozen_reference(tmp_path):
    config = _config(tmp_path, "full", "lora.enabled=false")
    context = build_context(config)
    method = DPO(context, config)
    assert method.frozen is not None and not any(p.requires_grad for p in method.frozen.parameters())
    assert method.frozen is not context.pipe.unet


def test_pixels_resize_crop_and_never_flip():
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 255, 255), (16, 0, 24, 32))  # a white bar left of centre
    tensor = pixels(image, 16)
    assert tensor.shape == (3, 16, 16)
    assert tensor.min() >= -1 and tensor.max() <= 1
    column = tensor[0].mean(dim=0)
    assert column[:8].mean() > column[8:].mean()  # the bar stays on the left


def test_epoch_order_draws_every_pair_before_repeating():
    order = epoch_order(5, 12, torch.Generator().manual_seed(0)).tolist()
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))
    assert len(order) == 12


def learning_probe(method, epochs: int, every: int) -> tuple[tuple, list[tuple]]:
    """Train ``method`` for ``epochs`` on its pairs, probing (implicit accuracy, mean logit, loss) on
    fixed noise and timesteps before and every ``every`` epochs."""
    pairs = method.data.pairs(list(range(8)) * 4)

    def probe():
        with torch.no_grad():
            terms = method.terms(pairs, torch.Generator().manual_seed(123))
        return (terms.logit > 0).float().mean().item(), terms.logit.mean().item(), terms.loss.item()

    before, curve = probe(), []
    for epoch in range(epochs):
        method.run_epoch(torch.Generator().manual_seed(epoch))
        if epoch % every == every - 1:
            curve.append(probe())
    return before, curve


def test_dpo_learns_a_separable_preference(tmp_path):
    """A few epochs on red-beats-blue pairs: on fixed noise and timesteps the trained model
    prefers the winner more than the reference does (at the start it is the reference: logit 0)."""
    # The tiny random UNet learns it with LoRA on its ResNet convolutions too (attention alone is slow).
    targets = "lora.target_modules=[to_q,to_k,to_v,to_out.0,conv1,conv2]"
    config = _config(tmp_path, "learn", "train.learning_rate=3e-3", "dpo.beta=500", "lora.rank=8", targets)
    method = DPO(build_context(config), config)
    before, curve = learning_probe(method, epochs=9, every=9)
    assert before == (0.0, 0.0, pytest.approx(math.log(2)))
    accuracy, margin, loss = curve[-1]
    assert accuracy >= 0.75 and margin > 0.5 and loss < math.log(2) - 0.1
    record = method.run_epoch(torch.Generator().manual_seed(9))
    assert set(record) >= {"loss", "implicit_accuracy", "reward_margin", "samples"}


def test_resumed_dpo_run_matches_uninterrupted_run(tmp_path):
    full = train(_config(tmp_path, "whole", "epochs=3"), progress=False)
    cut = _config(tmp_path, "cut", "epochs=2")
    train(cut, progress=False)
    resumed = train(_config(tmp_path, "cut", "epochs=3"), resume=True, progress=False)
    assert [record["epoch"] for record in resumed.history] == [0, 1, 2, 3]
    for ours, reference in zip(resumed.history[1:], full.history[1:]):
        for key in ("loss", "implicit_accuracy", "reward_margin", "chosen_error_vs_ref", "samples_seen"):
            assert ours[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-9), key
    weights = load_file(tmp_path / "whole" / "lora" / "pytorch_lora_weights.safetensors")
    resumed_weights = load_file(tmp_path / "cut" / "lora" / "pytorch_lora_weights.safetensors")
    for name, value in weights.items():
        torch.testing.assert_close(resumed_weights[name], value)


def test_config_rules_for_preference_data(tmp_path):
    with pytest.raises(ConfigError, match="learns from preference pairs"):
        load_config(None, [*TINY, "data="])
    with pytest.raises(ConfigError, match="read by offline methods"):
        load_config(None, ["method=ddpo", f"data={separable_pairs(tmp_path / 'd')}"])
    with pytest.raises(ConfigError, match="neither a registered preference set"):
        load_config(None, [*TINY, f"data={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(ConfigError, match="divisible"):
        _config(tmp_path, "x", "dpo.pairs_per_epoch=6")
    with pytest.raises(ConfigError, match="exploration"):
        _config(tmp_path, "y", "exploration=diffexp")
    # The online sampling epoch (sample.*) does not constrain an offline method's accumulation.
    config = _config(tmp_path, "z", "train.gradient_accumulation_steps=64", "dpo.pairs_per_epoch=512")
    assert config.train.gradient_accumulation_steps == 64


def test_two_processes_train_on_their_own_pairs_and_write_one_run(tmp_path):
    """`torchrun --nproc_per_node 2` on CPU: each process draws its own pairs; one set of outputs."""
    import subprocess
    import sys

    data = separable_pairs(tmp_path / "data")
    out = tmp_path / "mp"
    settings = [*TINY, f"data={data}", "epochs=1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "diffalign.cli"]
    command += ["train", "--no-progress", *[arg for item in settings for arg in ("--set", item)]]
    command += ["--output-dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("done: epoch 1, last implicit_accuracy") == 1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert lines[1]["samples"] == 2 * 8  # both processes' pairs are counted
    assert "(scored, not trained on)" in result.stdout and "(training reward)" not in result.stdout
