"""Overhead benchmark: does diffalign cost more than the compute it has to do?

Every figure here is a ratio between two things timed side by side in one process, so that
the answer does not depend on how fast this particular machine is:

1. **Sampling** — ``diffalign.sampling.sample`` (which also records every latent and the
   log-prob of every DDIM step) against the stock ``StableDiffusionPipeline.__call__`` at the
   same settings. Target: at most 5 % slower.
2. **DDPO epoch** — ``DDPO.run_epoch``, built exactly as ``diffalign.train`` builds it, against
   the *bare compute* that epoch cannot avoid, written with torch and diffusers only: the
   same text-encoder, UNet (CFG-doubled, no-grad) and VAE calls for the rollouts, the same
   number of UNet forward+backward calls on the same micro-batch shapes, and the same
   optimizer steps. Target: at most 20 % slower. The reward's share of the epoch is reported
   apart, because the reward is the user's choice, not diffalign's overhead.
3. **Peak memory** of each of the four things above (resident set size; on CUDA also
   ``torch.cuda.max_memory_allocated``).

Repetitions of the two things being compared are interleaved (A B, B A, A B, ...) after a
warm-up, and medians are reported, so that another process on the machine slows both alike.

    python -m diffalign.benchmarks.perf                 # full run, ~2-3 minutes on 2 CPU cores
    python -m diffalign.benchmarks.perf --quick         # smoke run, seconds

From Python: ``diffalign.benchmarks.perf.run(quick=True, output=None)`` returns the same dict
that the command writes as JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

SAMPLING_TARGET = 1.05  # our seconds / stock seconds
DDPO_TARGET = 1.2  # DDPO epoch seconds / bare-compute seconds
# Above this (max - min) / median of a series, the machine was too busy for 5 % differences to mean much.
NOISY_SPREAD = 0.15


@dataclass
class Settings:
    """The benchmarked configuration: diffalign's DDPO defaults on ``tiny-random``, but one sampling batch per epoch."""

    model: str = "tiny-random"  # built-in random-weight pipeline: no download, seconds per epoch on a CPU
    batch_size: int = 8  # images per sampling batch (sample.batch_size)
    steps: int = 20  # DDIM steps (sample.num_steps)
    guidance_scale: float = 5.0  # classifier-free guidance: every UNet call sees a doubled batch
    eta: float = 1.0  # DDIM eta; DDPO needs > 0
    lora_rank: int = 4  # LoRA rank (DDPO's value)
    # Sampling batches per DDPO epoch (sample.num_batches_per_epoch, 2 by default in training): one keeps the
    # run under 3 minutes, and more batches only scale both sides of the ratio alike.
    num_batches: int = 1
    train_batch_size: int = 4  # samples per training micro-batch (train.batch_size)
    reward: str = "jpeg-compressibility"  # model-free, so the reward share is small and honest
    repeats: int = 7  # timed repetitions of each compared pair (the median is reported)
    warmup: int = 1  # untimed runs of each candidate first: lazy initialisation, allocator growth
    seed: int = 0
    # torch intra-op threads; None keeps torch's default (one per core). On a shared machine 1 is
    # far steadier: two OpenMP threads wait for each other whenever another process takes a core.
    threads: int | None = None

    def overrides(self) -> list[str]:
        """The ``load_config`` overrides that make a ``TrainConfig`` of these settings."""
        return [
            "method=ddpo",  # the DDPO epoch is what is timed (the default job is AlignProp)
            f"model={self.model}",
            f"reward={self.reward}",
            f"seed={self.seed}",
            f"sample.batch_size={self.batch_size}",
            f"sample.num_steps={self.steps}",
            f"sample.guidance_scale={self.guidance_scale}",
            f"sample.eta={self.eta}",
            f"sample.num_batches_per_epoch={self.num_batches}",
            # Independent prompts and noise per image: the bare reference samples that way too.
            "sample.images_per_prompt=1",
            "sample.shared_initial_noise=false",
            f"train.batch_size={self.train_batch_size}",
            f"lora.rank={self.lora_rank}",
            f"lora.alpha={float(self.lora_rank)}",
            "tensorboard=false",
        ]


# Small enough for a test, large enough that every code path (CFG, accumulation, optimizer step) runs.
QUICK = Settings(batch_size=2, steps=3, num_batches=1, train_batch_size=2, repeats=1, warmup=1)


# --------------------------------------------------------------------------------------------
# Timing and memory


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock reading covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    candidates: dict[str, Callable[[int], object]], *, repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each candidate per repetition, the candidates alternating within every repetition.

    Each candidate is called with the repetition's index (to seed its randomness). The order is
    reversed every other repetition so that neither side always runs right after the other;
    together with interleaving this spreads machine noise — another process, frequency steps —
    over both sides alike, which back-to-back blocks of runs would not.
    """
    names = list(candidates)
    for index in range(warmup):
        for name in names:
            candidates[name](index)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for repetition in range(repeats):
        for name in names if repetition % 2 == 0 else names[::-1]:
            gc.collect()  # a collection triggered inside one side's timing would bill it for the other's garbage
            _synchronize(device)
            start = time.perf_counter()
            candidates[name](warmup + repetition)
            _synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def summary(seconds: list[float]) -> dict:
    """Median, extremes and relative spread of one timed series."""
    median = statistics.median(seconds)
    return {
        "median_s": median,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "relative_spread": (max(seconds) - min(seconds)) / median,
        "samples_s": seconds,
    }


_LIBC: ctypes.CDLL | None | bool = False  # False: not looked up yet; None: unavailable


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS, so the next phase's peak is not hidden by reuse.

    glibc keeps freed blocks mapped; without ``malloc_trim`` a phase that reuses the previous
    phase's freed memory would show no growth at all.
    """
    global _LIBC
    gc.collect()
    if _LIBC is False:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = None
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MB, or None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0: writing 5 to clear_refs); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")
        return True
    except OSError:
        return False


def _lifetime_peak_rss_mb() -> float:
    """The process's peak RSS so far: a fallback that cannot be reset per phase."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB elsewhere


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Peak memory of the ``with`` block, filled into the yielded dict on exit.

    Resident set size is what the OS has to provide for everything — torch's CPU tensors,
    Python objects, libraries — and needs no dependency: on Linux the kernel's high-water mark
    (VmHWM) is reset at entry, so the peak belongs to this block alone. Elsewhere the
    process-lifetime ``ru_maxrss`` is reported and ``rss_method`` says so. ``increase_mb`` is
    the peak above the resident size at entry: the block's own working memory.
    """
    record: dict = {}
    _release_freed_memory()
    per_phase = _reset_peak_rss() and _status_mb("VmHWM") is not None
    baseline = _status_mb("VmRSS") if per_phase else _lifetime_peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield record
    _synchronize(device)
    peak = _status_mb("VmHWM") if per_phase else _lifetime_peak_rss_mb()
    record.update(
        rss_method="VmHWM reset per phase" if per_phase else "ru_maxrss (process lifetime, not per phase)",
        baseline_rss_mb=baseline,
        peak_rss_mb=peak,
        increase_mb=peak - baseline,
    )
    if device.type == "cuda":
        record["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20


# --------------------------------------------------------------------------------------------
# 1. Sampling: diffalign's sampler against the stock pipeline


def benchmark_sampling(settings: Settings, device: torch.device) -> dict:
    """Seconds per batch of ``sample(...)`` and of ``pipe(...)`` on one plain pipeline, interleaved.

    Both sides run on the same pipeline object (no LoRA: this measures the sampler, and a
    LoRA would slow both alike), with the same prompts, steps, guidance, eta and decode.
    """
    from diffalign import pipeline
    from diffalign import prompts as prompt_sets
    from diffalign.sampling import sample

    pipe = pipeline.load(settings.model, seed=settings.seed)
    pipe.to(device)
    prompts = prompt_sets.draw(
        prompt_sets.load_prompts("simple-animals"),
        settings.batch_size,
        torch.Generator().manual_seed(settings.seed),
    )

    def ours(index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(settings.seed + index)
        return sample(
            pipe,
            prompts,
            num_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            eta=settings.eta,
            generator=generator,
        ).images

    def stock(index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(settings.seed + index)
        return pipe(
            prompts,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            eta=settings.eta,
            generator=generator,
            output_type="pt",
        ).images

    seconds = interleaved(
        {"ours": ours, "stock": stock}, repeats=settings.repeats, warmup=settings.warmup, device=device
    )
    memory = {}
    for name, function in (("ours", ours), ("stock", stock)):
        with peak_memory(device) as memory[name]:
            function(0)
    ours_s, stock_s = summary(seconds["ours"]), summary(seconds["stock"])
    ratio = ours_s["median_s"] / stock_s["median_s"]
    paired = [a / b for a, b in zip(seconds["ours"], seconds["stock"])]
    return {
        "ours": ours_s,
        "stock": stock_s,
        "ours_images_per_s": settings.batch_size / ours_s["median_s"],
        "stock_images_per_s": settings.batch_size / stock_s["median_s"],
        "ratio": ratio,
        "paired_ratio_median": statistics.median(paired),
        "target": SAMPLING_TARGET,
        "passed": ratio <= SAMPLING_TARGET,
        "memory": memory,
    }


# --------------------------------------------------------------------------------------------
# 2. DDPO epoch against the bare compute it needs


class TimedReward:
    """Forwards to a reward and adds up the seconds spent in it.

    Passed as the ``TrainContext`` reward, it measures the reward's share of an epoch without
    touching the training code.
    """

    def __init__(self, reward, device: torch.device):
        self.reward = reward
        self.name = reward.name
        self.differentiable = reward.differentiable
        self.device = device
        self.seconds = 0.0

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        _synchronize(self.device)  # images still being decoded are the sampler's time, not the reward's
        start = time.perf_counter()
        scores = self.reward(images, prompts)
        _synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return scores


def build_ddpo(settings: Settings):
    """``(DDPO method, TimedReward, accelerator)`` built by ``diffalign.train.build_context``, as training does."""
    from diffalign import rewards
    from diffalign.config import load_config
    from diffalign.optim.ddpo import DDPO
    from diffalign.train import build_context

    config = load_config(None, settings.overrides())
    reward = rewards.build(config.reward, **config.reward_options)
    timed = TimedReward(reward, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    context = build_context(config, timed)
    return DDPO(context, config), timed, context.accelerator


class BareEpoch:
    """The compute one DDPO epoch of ``config`` cannot avoid, in torch and diffusers only.

    Rollouts: per sampling batch one text-encoder call on prompts and empty prompts, ``steps``
    no-grad UNet calls on the CFG-doubled batch with the stock ``DDIMScheduler.step``, and one
    VAE decode. Updates: one UNet forward+backward on the CFG-doubled micro-batch per (micro-
    batch, trained timestep), with per-sample timesteps as DDPO uses, and a gradient clip plus
    AdamW step every accumulation period. What is *not* here — log-probs, rewards, advantages,
    the PPO loss, accelerate's bookkeeping — is what the ratio charges to diffalign (the reward
    is reported apart). The pipeline is built with ``diffalign.pipeline`` (setup, untimed) so
    that it has exactly the same weights and LoRA layers as the trained one.
    """

    def __init__(self, settings: Settings, device: torch.device):
        from diffalign import pipeline
        from diffalign import prompts as prompt_sets
        from diffalign.config import load_config
        from diffalign.optim.ddpo import DDPO, trained_steps

        config = load_config(None, settings.overrides())
        self.config = config
        self.device = device
        self.pipe = pipeline.load(config.model, seed=config.seed)
        self.pipe.to(device)
        pipeline.add_lora(self.pipe, rank=config.lora.rank, alpha=config.lora.alpha)
        self.parameters = [p for p in self.pipe.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.parameters,
            lr=config.train.learning_rate,
            betas=(config.train.adam_beta1, config.train.adam_beta2),
            weight_decay=config.train.adam_weight_decay,
            eps=config.train.adam_epsilon,
        )
        self.prompts = prompt_sets.load_prompts(config.prompts)
        self.trained = trained_steps(config)
        self.accumulation = DDPO.accumulation_steps(config)
        self.sampling_seconds = 0.0  # of the last call, to show where bare time goes
        self.training_seconds = 0.0

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.pipe.text_encoder(ids)[0]  # [N, L, D]

    @torch.no_grad()
    def _rollout(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sampling batch: ``(latents  # [B, T+1, C, h, w], embeds  # [2B, L, D], timesteps  # [T])``."""
        pipe, sample = self.pipe, self.config.sample
        batch = sample.batch_size
        index = torch.randint(len(self.prompts), (batch,), generator=generator).tolist()
        embeds = self._encode([sample.negative_prompt] * batch + [self.prompts[i] for i in index])
        pipe.scheduler.set_timesteps(sample.num_steps, device=self.device)
        size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
        latents = torch.randn((batch, channels, size, size), generator=generator).to(self.device)
        latents = latents * pipe.scheduler.init_noise_sigma
        chain = [latents]
        for timestep in pipe.scheduler.timesteps:
            noise = pipe.unet(torch.cat([latents, latents]), timestep, encoder_hidden_states=embeds).sample
            uncond, cond = noise.chunk(2)
            noise = uncond + sample.guidance_scale * (cond - uncond)
            latents = pipe.scheduler.step(
                noise, timestep, latents, eta=sample.eta, generator=generator
            ).prev_sample
            chain.append(latents)
        _ = pipe.vae.decode(
            latents / pipe.vae.config.scaling_factor
        ).sample  # decoding is part of what is timed
        return torch.stack(chain, dim=1), embeds, pipe.scheduler.timesteps

    def __call__(self, index: int) -> None:
        config, unet = self.config, self.pipe.unet
        generator = torch.Generator().manual_seed(self.config.seed + index)
        start = time.perf_counter()
        unet.eval()
        rollouts = [self._rollout(generator) for _ in range(config.sample.num_batches_per_epoch)]
        unet.train()
        _synchronize(self.device)
        self.sampling_seconds = time.perf_counter() - start
        latents = torch.cat([chain for chain, _, _ in rollouts])  # [N, T+1, C, h, w]
        embeds = torch.cat([e.reshape(2, -1, *e.shape[1:]) for _, e, _ in rollouts], dim=1)  # [2, N, L, D]
        timesteps = rollouts[0][2]
        count, micro = latents.shape[0], config.train.batch_size
        step_count = 0
        for _ in range(config.train.inner_epochs):
            for first in range(0, count, micro):
                rows = torch.arange(first, min(first + micro, count))
                for _ in range(self.trained):
                    step = torch.randint(len(timesteps), (len(rows),), generator=generator)
                    x = latents[rows, step]
                    t = timesteps[step.to(timesteps.device)]
                    noise = unet(
                        torch.cat([x, x]),
                        torch.cat([t, t]),
                        encoder_hidden_states=torch.cat([embeds[0, rows], embeds[1, rows]]),
                    ).sample
                    uncond, cond = noise.chunk(2)
                    loss = (uncond + config.sample.guidance_scale * (cond - uncond)).float().pow(2).mean()
                    loss.backward()
                    step_count += 1
                    if step_count % self.accumulation == 0:
                        torch.nn.utils.clip_grad_norm_(self.parameters, config.train.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad()
        _synchronize(self.device)
        self.training_seconds = time.perf_counter() - start - self.sampling_seconds


def benchmark_ddpo(settings: Settings) -> dict:
    """Seconds per ``DDPO.run_epoch`` and per bare epoch, interleaved, with the reward's share."""
    method, timed_reward, accelerator = build_ddpo(settings)
    device = accelerator.device
    bare = BareEpoch(settings, device)
    reward_seconds: list[float] = []
    bare_parts: list[tuple[float, float]] = []

    def ddpo_epoch(index: int) -> None:
        timed_reward.seconds = 0.0
        method.run_epoch(torch.Generator().manual_seed(settings.seed + index))
        reward_seconds.append(timed_reward.seconds)

    def bare_epoch(index: int) -> None:
        bare(index)
        bare_parts.append((bare.sampling_seconds, bare.training_seconds))

    seconds = interleaved(
        {"ddpo": ddpo_epoch, "bare": bare_epoch},
        repeats=settings.repeats,
        warmup=settings.warmup,
        device=device,
    )
    timed_reward_s = reward_seconds[settings.warmup :]  # the timed repetitions only
    timed_parts = bare_parts[settings.warmup :]
    memory = {}
    for name, function in (("ddpo", ddpo_epoch), ("bare", bare_epoch)):
        with peak_memory(device) as memory[name]:
            function(settings.warmup + settings.repeats)
    ddpo_s, bare_s = summary(seconds["ddpo"]), summary(seconds["bare"])
    reward_s = statistics.median(timed_reward_s)
    ratio = ddpo_s["median_s"] / bare_s["median_s"]
    without_reward = [total - spent for total, spent in zip(seconds["ddpo"], timed_reward_s)]
    paired = [a / b for a, b in zip(seconds["ddpo"], seconds["bare"])]
    return {
        "ddpo_epoch": ddpo_s,
        "bare": bare_s,
        "bare_sampling_s": statistics.median(part[0] for part in timed_parts),
        "bare_training_s": statistics.median(part[1] for part in timed_parts),
        "ratio": ratio,
        "paired_ratio_median": statistics.median(paired),
        "target": DDPO_TARGET,
        "passed": ratio <= DDPO_TARGET,
        "reward_s": reward_s,
        "reward_share": statistics.median(r / t for r, t in zip(timed_reward_s, seconds["ddpo"])),
        "ratio_without_reward": statistics.median(without_reward) / bare_s["median_s"],
        "images_per_epoch": settings.batch_size * settings.num_batches,
        "unet_training_calls_per_epoch": (
            settings.batch_size * settings.num_batches // settings.train_batch_size
        )
        * bare.trained
        * bare.config.train.inner_epochs,
        "optimizer_steps_per_epoch": (settings.batch_size * settings.num_batches // settings.train_batch_size)
        * bare.trained
        * bare.config.train.inner_epochs
        // bare.accumulation,
        "memory": memory,
    }


# --------------------------------------------------------------------------------------------
# Report


def machine_info(device: torch.device) -> dict:
    """What the numbers depend on: library versions, threads, cores, load on the machine."""
    import accelerate
    import diffusers
    import peft

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "diffusers": diffusers.__version__,
        "accelerate": accelerate.__version__,
        "peft": peft.__version__,
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
    }
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    return info


def _load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def run(
    *,
    quick: bool = False,
    batch_size: int | None = None,
    steps: int | None = None,
    repeats: int | None = None,
    threads: int | None = None,
    output: str | Path | None = None,
    settings: Settings | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run every benchmark and return the figures; also write them as JSON to ``output`` (None: don't).

    ``quick`` starts from tiny sizes and one repetition (a smoke test: the ratios then mean
    little); ``batch_size``, ``steps``, ``repeats`` and ``threads`` override either starting point.
    """
    base = settings or (QUICK if quick else Settings())
    changes = {
        name: value
        for name, value in (
            ("batch_size", batch_size),
            ("steps", steps),
            ("repeats", repeats),
            ("threads", threads),
        )
        if value is not None
    }
    settings = replace(base, **changes)
    if settings.batch_size * settings.num_batches % settings.train_batch_size:
        # Config validation would refuse the run; shrink the micro-batch rather than fail on a CLI size.
        settings = replace(
            settings,
            train_batch_size=math.gcd(settings.batch_size * settings.num_batches, settings.train_batch_size),
        )
    log = log or (lambda message: None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads_before = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _run(settings, quick, output, log, device)
    finally:
        torch.set_num_threads(threads_before)


def _run(
    settings: Settings,
    quick: bool,
    output: str | Path | None,
    log: Callable[[str], None],
    device: torch.device,
) -> dict:
    started = time.perf_counter()
    load_before = _load_average()
    log(f"sampling: {settings.repeats} interleaved repetitions of sample() and pipe() ...")
    sampling = benchmark_sampling(settings, device)
    log(f"DDPO: {settings.repeats} interleaved repetitions of run_epoch() and the bare epoch ...")
    ddpo = benchmark_ddpo(settings)
    machine = machine_info(device)
    machine["load_average_before"] = load_before
    machine["load_average_after"] = _load_average()
    series = [sampling["ours"], sampling["stock"], ddpo["ddpo_epoch"], ddpo["bare"]]
    result = {
        "settings": asdict(settings),
        "quick": quick,
        "sampling": sampling,
        "ddpo": ddpo,
        "noisy": any(item["relative_spread"] > NOISY_SPREAD for item in series),
        "machine": machine,
        "wall_s": time.perf_counter() - started,
    }
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n", "utf-8")
        result["output"] = str(output)
    return result


def _loads(values: list[float] | None) -> str:
    return "n/a" if values is None else "/".join(f"{value:.2f}" for value in values)


def format_table(result: dict) -> str:
    """The figures of ``run`` as a plain-text table: metric, ours, reference, ratio, target, result."""
    sampling, ddpo = result["sampling"], result["ddpo"]

    def number(value):
        if value is None:
            return "—"
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"

    def row(metric, ours, reference, ratio=None, target=None, passed=None):
        verdict = "—" if passed is None else ("PASS" if passed else "FAIL")
        ratio_text = ratio if isinstance(ratio, str) else ("—" if ratio is None else f"{ratio:.3f}")
        return (
            metric,
            number(ours),
            number(reference),
            ratio_text,
            "—" if target is None else f"≤ {target:g}",
            verdict,
        )

    rows = [
        ("metric", "ours", "reference", "ratio", "target", "result"),
        row(
            "sampling s/batch (ref: stock pipe)",
            sampling["ours"]["median_s"],
            sampling["stock"]["median_s"],
            sampling["ratio"],
            sampling["target"],
            sampling["passed"],
        ),
        row("sampling images/s", sampling["ours_images_per_s"], sampling["stock_images_per_s"]),
        row(
            "DDPO epoch s (ref: bare compute)",
            ddpo["ddpo_epoch"]["median_s"],
            ddpo["bare"]["median_s"],
            ddpo["ratio"],
            ddpo["target"],
            ddpo["passed"],
        ),
        row(
            "DDPO epoch s without reward",
            ddpo["ddpo_epoch"]["median_s"] - ddpo["reward_s"],
            ddpo["bare"]["median_s"],
            ddpo["ratio_without_reward"],
        ),
        row("  reward s/epoch (share of epoch)", ddpo["reward_s"], None, f"{ddpo['reward_share']:.2%}"),
        row("  bare: rollouts s / updates s", ddpo["bare_sampling_s"], ddpo["bare_training_s"]),
    ]
    for label, section, ours, reference in (
        ("sampling", sampling, "ours", "stock"),
        ("DDPO epoch", ddpo, "ddpo", "bare"),
    ):
        memory = section["memory"]
        rows.append(
            row(
                f"peak RSS MB, {label}",
                memory[ours]["peak_rss_mb"],
                memory[reference]["peak_rss_mb"],
                memory[ours]["peak_rss_mb"] / memory[reference]["peak_rss_mb"],
            )
        )
        rows.append(
            row(f"  RSS growth MB, {label}", memory[ours]["increase_mb"], memory[reference]["increase_mb"])
        )
        if "cuda_max_allocated_mb" in memory[ours]:
            rows.append(
                row(
                    f"CUDA max allocated MB, {label}",
                    memory[ours]["cuda_max_allocated_mb"],
                    memory[reference]["cuda_max_allocated_mb"],
                    memory[ours]["cuda_max_allocated_mb"] / memory[reference]["cuda_max_allocated_mb"],
                )
            )
    widths = [max(len(line[column]) for line in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    settings, machine = result["settings"], result["machine"]
    spreads = ", ".join(
        f"{name} {item['relative_spread']:.0%}"
        for name, item in (
            ("ours", sampling["ours"]),
            ("stock", sampling["stock"]),
            ("ddpo", ddpo["ddpo_epoch"]),
            ("bare", ddpo["bare"]),
        )
    )
    lines += [
        "",
        (
            f"{settings['model']}, batch {settings['batch_size']}, {settings['steps']} DDIM steps, guidance "
            f"{settings['guidance_scale']:g}, eta {settings['eta']:g}, LoRA rank {settings['lora_rank']}, "
            f"{settings['reward']}; median of {settings['repeats']} interleaved repetitions"
        ),
        (
            f"torch {machine['torch']} on {machine['device']}, torch threads: {machine['torch_threads']}, "
            f"{machine['cpu_count']} CPUs, load average (1/5/15 min) {_loads(machine['load_average_before'])} → "
            f"{_loads(machine['load_average_after'])}; run took {result['wall_s']:.0f} s"
        ),
        f"spread (max-min)/median: {spreads}",
    ]
    if result["noisy"]:
        lines.append(
            f"NOISY: a series spread more than {NOISY_SPREAD:.0%}; the machine was busy — re-run "
            "before trusting a few-percent difference."
        )
    if result.get("output"):
        lines.append(f"JSON: {result['output']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffalign.benchmarks.perf",
        description="Time diffalign's sampler and DDPO epoch against the stock pipeline and the bare compute "
        "they need, side by side in one process. Python: diffalign.benchmarks.perf.run(...).",
    )
    parser.add_argument(
        "--batch-size", type=int, help=f"images per sampling batch (default {Settings.batch_size})"
    )
    parser.add_argument("--steps", type=int, help=f"DDIM steps (default {Settings.steps})")
    parser.add_argument(
        "--repeats", type=int, help=f"timed repetitions per pair (default {Settings.repeats})"
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's own; 1 is steadier on a busy machine)"
    )
    parser.add_argument(
        "--output",
        default="results/perf",
        help="folder for perf.json (default: %(default)s, under the current folder)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repetition: a smoke run")
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    result = run(
        quick=args.quick,
        batch_size=args.batch_size,
        steps=args.steps,
        repeats=args.repeats,
        threads=args.threads,
        output=Path(args.output) / "perf.json",
        log=lambda message: print(message, file=sys.stderr),
    )
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
