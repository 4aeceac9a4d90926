import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from diffalign import pipeline


def test_tiny_random_is_a_real_sd_pipeline_with_ddim(tiny_pipe):
    assert isinstance(tiny_pipe, StableDiffusionPipeline)
    assert type(tiny_pipe.scheduler).__name__ == "DDIMScheduler"
    size = sum(p.numel() for p in tiny_pipe.components["unet"].parameters())
    assert size < 2_000_000


def test_tiny_random_is_seeded(tiny_pipe_factory):
    first, second, other = tiny_pipe_factory(0), tiny_pipe_factory(0), tiny_pipe_factory(1)
    weight = lambda pipe: next(pipe.unet.parameters())
    assert torch.equal(weight(first), weight(second))
    assert not torch.equal(weight(first), weight(other))


def test_local_folder_round_trip_and_scheduler_conversion(tiny_pipe, tmp_path):
    tiny_pipe.scheduler = EulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    loaded = pipeline.load(str(tmp_path / "pipe"))
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert torch.equal(next(loaded.unet.parameters()), next(tiny_pipe.unet.parameters()))


def test_bad_specs_are_clear_errors(tmp_path):
    with pytest.raises(pipeline.PipelineError, match="does not exist"):
        pipeline.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(pipeline.PipelineError, match="model_index.json"):
        pipeline.load(str(tmp_path / "empty"))


def test_scheduler_without_ddim_schedule_is_refused(tiny_pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    tiny_pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(pipeline.PipelineError, match="DDIM"):
        pipeline.ddim_scheduler_for(tiny_pipe)


def test_lora_starts_as_identity_and_loads_in_plain_diffusers(tiny_pipe_factory, tmp_path):
    pipe = tiny_pipe_factory()
    latents = torch.randn(1, 4, 16, 16)
    embeds = torch.randn(1, 77, 32)
    before = pipe.unet(latents, 500, encoder_hidden_states=embeds).sample
    pipeline.add_lora(pipe, rank=4)
    trainable = [p for p in pipe.unet.parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n, p in pipe.unet.named_parameters() if p.requires_grad)
    torch.testing.assert_close(pipe.unet(latents, 500, encoder_hidden_states=embeds).sample, before)
    with torch.no_grad():
        for parameter in trainable:
            parameter.add_(0.05 * torch.randn_like(parameter))
    tuned = pipe.unet(latents, 500, encoder_hidden_states=embeds).sample
    pipeline.save_lora(pipe.unet, tmp_path / "lora")

    plain = tiny_pipe_factory()
    plain.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(plain.unet(latents, 500, encoder_hidden_states=embeds).sample, tuned)

    resumed = tiny_pipe_factory()
    pipeline.add_lora(resumed, rank=4)
    pipeline.load_lora_into_adapter(resumed.unet, tmp_path / "lora")
    torch.testing.assert_close(resumed.unet(latents, 500, encoder_hidden_states=embeds).sample, tuned)


def test_lora_on_convolutions_and_feed_forward_with_alpha_loads_whole(tiny_pipe_factory, tmp_path):
    # Attention, feed-forward and convolution targets with alpha != rank: every weight and the
    # scale must survive the file. (The older diffusers key format renamed only attention keys,
    # and load_lora_weights then dropped them; without the config in the header alpha was lost.)
    targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")
    pipe = tiny_pipe_factory()
    pipeline.add_lora(pipe, rank=2, alpha=8, target_modules=targets)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    latents, embeds = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    tuned = pipe.unet(latents, 500, encoder_hidden_states=embeds).sample
    pipeline.save_lora(pipe.unet, tmp_path / "lora")

    plain = tiny_pipe_factory()
    base = plain.unet(latents, 500, encoder_hidden_states=embeds).sample
    plain.load_lora_weights(str(tmp_path / "lora"))
    loaded = plain.unet(latents, 500, encoder_hidden_states=embeds).sample
    assert (tuned - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded, tuned)

    resumed = tiny_pipe_factory()
    pipeline.add_lora(resumed, rank=2, alpha=8, target_modules=targets)
    pipeline.load_lora_into_adapter(resumed.unet, tmp_path / "lora")
    torch.testing.assert_close(resumed.unet(latents, 500, encoder_hidden_states=embeds).sample, tuned)


def test_resume_refuses_an_adapter_with_fewer_targets(tiny_pipe_factory, tmp_path):
    small = tiny_pipe_factory()
    pipeline.add_lora(small, rank=2, target_modules=("to_q", "to_v"))
    pipeline.save_lora(small.unet, tmp_path / "lora")
    larger = tiny_pipe_factory()
    pipeline.add_lora(larger, rank=2, target_modules=("to_q", "to_v", "conv1"))
    with pytest.raises(pipeline.PipelineError, match="lacks weights"):
        pipeline.load_lora_into_adapter(larger.unet, tmp_path / "lora")


def test_memory_switches_are_safe_without_gpu(tiny_pipe):
    with pytest.warns(UserWarning, match="xformers"):
        pipeline.enable_memory_savers(tiny_pipe, xformers=True)
    pipeline.enable_memory_savers(tiny_pipe, attention_slicing=True, gradient_checkpointing=True)
    assert tiny_pipe.unet.is_gradient_checkpointing


# --- swapping the VAE ------------------------------------------------------------------------------


def _perturbed_vae_folder(pipe, folder, **config_changes):
    """A copy of ``pipe``'s VAE with other weights (and config), saved as an AutoencoderKL folder."""
    from diffusers import AutoencoderKL

    # Without "_use_default_values", which would reset the changed keys to their defaults.
    config = {key: value for key, value in pipe.vae.config.items() if key != "_use_default_values"}
    config.update(config_changes)
    vae = AutoencoderKL.from_config(config)
    if not config_changes:
        vae.load_state_dict(pipe.vae.state_dict())
        with torch.no_grad():
            for parameter in vae.decoder.parameters():
                parameter.add_(0.01)
    vae.save_pretrained(folder)
    return vae


def test_swap_vae_puts_a_folders_autoencoder_into_the_pipeline(tmp_path, tiny_pipe):
    saved = _perturbed_vae_folder(tiny_pipe, tmp_path / "vae")
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = tiny_pipe.vae.decode(latents).sample
    swapped = pipeline.swap_vae(tiny_pipe, str(tmp_path / "vae"), "tiny-random")
    assert tiny_pipe.vae is swapped and not any(p.requires_grad for p in swapped.parameters())
    with torch.no_grad():
        after, expected = tiny_pipe.vae.decode(latents).sample, saved.decode(latents).sample
    assert torch.allclose(after, expected) and not torch.allclose(after, before)
    # A pipeline folder's vae/ is found too.
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    pipeline.swap_vae(tiny_pipe, str(tmp_path / "pipe"), "tiny-random")


def test_swap_vae_refuses_other_latents_unknown_names_and_other_models(tmp_path, tiny_pipe):
    _perturbed_vae_folder(tiny_pipe, tmp_path / "wide", latent_channels=8)
    with pytest.raises(pipeline.PipelineError, match="latent_channels is 8, the pipeline's is 4"):
        pipeline.swap_vae(tiny_pipe, str(tmp_path / "wide"), "tiny-random")
    _perturbed_vae_folder(tiny_pipe, tmp_path / "scaled", scaling_factor=0.5)
    with pytest.raises(pipeline.PipelineError, match="scaling_factor"):
        pipeline.swap_vae(tiny_pipe, str(tmp_path / "scaled"), "tiny-random")
    _perturbed_vae_folder(tiny_pipe, tmp_path / "centred", shift_factor=0.0609)  # SD3's VAE into SD 1.x
    with pytest.raises(pipeline.PipelineError, match="shift_factor is 0.0609, the pipeline's is 0.0"):
        pipeline.swap_vae(tiny_pipe, str(tmp_path / "centred"), "tiny-random")
    with pytest.raises(pipeline.PipelineError, match="Did you mean 'shapes-vae-marked'"):
        pipeline.swap_vae(tiny_pipe, "shapes-vae-marks", "tiny-random")
    with pytest.raises(
        pipeline.PipelineError, match="made for the models shapes, shapes-flow, not 'tiny-random'"
    ):
        pipeline.swap_vae(tiny_pipe, "shapes-vae-marked", "tiny-random")
