"""``shapes-vae-marked``: the shipped ShapesWorld VAE fine-tuned to draw marked shapes, in the same latent space.

Why it exists. The shipped VAE (``training.train_vae``) only ever saw plain single-colour shapes. A
MuDI subject is a shape with a marking (``identities``: a dot, a band or a half in a second colour),
and the shipped autoencoder cannot carry one through its 8×8×4 latent: encoded and decoded, 8 %
of random marked scenes and 2 % of renders of the catalogue's identities are read back exactly
(the markings vanish or blur into a third colour). No personalisation of the UNet can draw what the
decoder cannot, so without this VAE every ShapesWorld MuDI figure would measure the autoencoder.

What it is. Stable Diffusion users meet the same limit and swap in a fine-tuned autoencoder
(``stabilityai/sd-vae-ft-mse``: the same latent space, a better decoder); ``pipeline.swap_vae`` and
the ``vae`` key of ``diffalign personalize`` do that here. This recipe fine-tunes the shipped VAE on
scenes of marked and plain shapes with the base recipe's reconstruction loss (L1 + L2), and keeps
the latent space the UNet was trained on with an *anchor* term: on plain scenes the new encoder's
posterior mean must stay where the shipped encoder put it,

    L = ‖D(E(x)) − x‖² + |D(E(x)) − x| + w · ‖μ_new(x_plain) − μ_old(x_plain)‖²

so the UNet's plain-shape latents still decode to what they did, and ``scaling_factor`` is kept.
``train_marked_vae`` reports the figures that say whether that held (``measure``): marked and plain
scenes read exactly after a round trip, the catalogue's identities read exactly, and the plain
latents' drift relative to their spread. The shipped weights are ``diffalign shapes train-vae-marked``
with the defaults below; its figures are in ``docs/personalize.md``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.optimization import get_cosine_schedule_with_warmup
from tqdm.auto import tqdm

from diffalign.shapes import assets
from diffalign.shapes.identities import (
    CATALOGUE,
    Traits,
    detect_identities,
    place_identities,
    random_traits,
    read_objects,
    render_identities,
)


@dataclass
class MarkedVaeConfig:
    """Hyperparameters of the fine-tune (defaults: the shipped ``shapes-vae-marked``)."""

    seed: int = 0
    steps: int = (
        2000  # trial runs (constant lr): marked scenes exact 0.41 → 0.73 → 0.86 at 250 → 1000 → 1500 steps
    )
    batch_size: int = 32
    learning_rate: float = (
        5e-4  # 3e-4 on the decoder alone plateaued near 0.47; encoder + decoder learn faster
    )
    warmup_steps: int = 50
    plain_share: float = 0.3  # of the objects in a training scene: plain shapes stay well drawn
    anchor_weight: float = 10.0  # w: plain scenes' latents stay where the shipped encoder put them
    anchor_batch_size: int = 16
    pool_size: int = 20_000  # scenes rendered once, drawn from at random
    eval_scenes: int = 300


def random_scenes(count: int, rng: np.random.Generator, plain: float) -> np.ndarray:
    """``[count, 32, 32, 3]`` uint8: scenes of one to three objects, each marked or (``plain``) plain."""
    scenes = []
    for _ in range(count):
        looks = [random_traits(rng, plain=plain) for _ in range(int(rng.integers(1, 4)))]
        scenes.append(render_identities(place_identities(looks, rng)))
    return np.stack(scenes)


def _pixels(scenes: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(scenes).float().permute(0, 3, 1, 2) / 127.5 - 1


def _uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()


@torch.no_grad()
def round_trip(vae: AutoencoderKL, scenes: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The scenes encoded (posterior mean) and decoded by ``vae``, as uint8 images."""
    out = []
    for start in range(0, len(scenes), batch_size):
        x = _pixels(scenes[start : start + batch_size]).to(vae.device, vae.dtype)
        out.append(_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample.float().cpu()))
    return np.concatenate(out)


@torch.no_grad()
def measure(
    vae: AutoencoderKL, base: AutoencoderKL | None = None, *, scenes: int = 300, seed: int = 1
) -> dict:
    """What a round trip through ``vae`` keeps, on fresh seeded scenes:

    - ``marked_exact``: share of scenes of one to three objects (10 % plain) whose every object's
      four traits the identity detector reads back exactly;
    - ``plain_exact``: the same for scenes of plain shapes only;
    - ``catalogue_exact``: share of single catalogued identities (each of the eight equally often)
      read back as themselves;
    - with ``base``: ``plain_latent_drift``, the RMS change of plain scenes' latent means relative to
      their RMS under ``base`` (0 = the same latent space).
    """
    rng = np.random.default_rng(seed)
    looks_marked = [
        [random_traits(rng, plain=0.1) for _ in range(int(rng.integers(1, 4)))] for _ in range(scenes)
    ]
    looks_plain = [
        [random_traits(rng, plain=1.0) for _ in range(int(rng.integers(1, 4)))] for _ in range(scenes)
    ]
    identities = list(CATALOGUE.values())
    catalogue = [[identities[k % len(identities)]] for k in range(scenes)]
    result = {}
    for name, groups in (
        ("marked_exact", looks_marked),
        ("plain_exact", looks_plain),
        ("catalogue_exact", catalogue),
    ):
        images = np.stack([render_identities(place_identities(g, rng)) for g in groups])
        back = round_trip(vae, images)
        if name == "catalogue_exact":
            hits = [
                [d.identity for d in detect_identities(image, identities)] == [g[0].name]
                for image, g in zip(back, groups, strict=True)
            ]
        else:
            hits = [
                sorted(repr(t) for t, _, _ in read_objects(image))
                == sorted(repr(Traits(*t.traits.slots())) for t in g)
                for image, g in zip(back, groups, strict=True)
            ]
        result[name] = float(np.mean(hits))
    if base is not None:
        plain = _pixels(np.stack([render_identities(place_identities(g, rng)) for g in looks_plain]))
        old = base.encode(plain.to(base.device, base.dtype)).latent_dist.mean.float()
        new = vae.encode(plain.to(vae.device, vae.dtype)).latent_dist.mean.float()
        result["plain_latent_drift"] = float((new - old).pow(2).mean().sqrt() / old.pow(2).mean().sqrt())
    return result


def finetune(
    vae: AutoencoderKL, config: MarkedVaeConfig, *, progress: bool = True
) -> tuple[AutoencoderKL, list[float]]:
    """The fine-tune of the module doc, on a copy of ``vae`` (fp32); returns it and its losses."""
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    base = copy.deepcopy(vae).float().eval().requires_grad_(False)
    model = copy.deepcopy(vae).float().train().requires_grad_(True)
    pool = random_scenes(config.pool_size, rng, config.plain_share)
    plain_pool = random_scenes(config.pool_size // 4, rng, 1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    losses = []
    for _ in tqdm(range(config.steps), desc="fine-tune VAE on marked shapes", disable=not progress):
        x = _pixels(pool[torch.randint(len(pool), (config.batch_size,), generator=generator).numpy()])
        posterior = model.encode(x).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = model.decode(latents).sample
        loss = F.mse_loss(reconstruction, x) + F.l1_loss(reconstruction, x)
        if config.anchor_weight > 0:
            plain = _pixels(
                plain_pool[
                    torch.randint(len(plain_pool), (config.anchor_batch_size,), generator=generator).numpy()
                ]
            )
            with torch.no_grad():
                anchor = base.encode(plain).latent_dist.mean
            loss = loss + config.anchor_weight * F.mse_loss(model.encode(plain).latent_dist.mean, anchor)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the VAE fine-tune's loss became {loss.item()} at step {len(losses)}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model.eval().requires_grad_(False), losses


def train_marked_vae(
    config: MarkedVaeConfig, output: Path, *, fp16: bool = True, progress: bool = True
) -> dict:
    """Fine-tune the shipped VAE and save ``output/vae`` (an ``AutoencoderKL`` folder) and
    ``output/training_report.json`` (``measure`` before and after, seconds, losses)."""
    torch.manual_seed(config.seed)
    base = assets.load_pipeline().vae.float().eval()
    before = measure(base, scenes=config.eval_scenes)
    started = time.perf_counter()
    vae, losses = finetune(base, config, progress=progress)
    seconds = time.perf_counter() - started
    after = measure(vae, base, scenes=config.eval_scenes)
    folder = output / "vae"
    folder.mkdir(parents=True, exist_ok=True)
    vae.to(torch.float16 if fp16 else torch.float32).save_pretrained(folder, safe_serialization=True)
    return assets.write_fine_tune_report(output, asdict(config), before, after, seconds, losses)


def install(vae_folder: Path, destination: Path = assets.MARKED_VAE_DIR) -> None:
    """Copy a fine-tuned VAE's config and weights to where ``shapes-vae-marked`` reads them."""
    assets.install_weights(vae_folder, destination, ("config.json", "diffusion_pytorch_model.safetensors"))
