"""Peer comparison: trl 0.23.1's ``DDPOTrainer`` on the problem diffalign's DDPO is measured on.

trl removed DDPO after 0.23, and its pins differ from diffalign's, so trl lives only in its own
virtual environment, which this script creates; it is never a dependency of diffalign. The peer
venv also gets a copy of diffalign (installed from this repository, non-editable, so the
repository is not touched), because the problem is defined by diffalign's parts: the shipped
ShapesWorld pipeline folder, the exact ``shapes-oracle`` reward, the ``shapes-count`` prompts
and the fixed-noise ``Evaluator`` whose metric keys ``eval/<set>/shapes-oracle`` the studies read.

    python benchmarks/peers/trl_ddpo.py --setup                     # ./.venv-peers/trl (minutes, ~6 GB)
    python benchmarks/peers/trl_ddpo.py --seed 0 --epochs 20        # -> ./results/peers/trl-ddpo-seed0/

The run mode may be started with any python: it re-executes itself with the peer venv's python.
trl is used as a user would: ``DefaultDDPOStableDiffusionPipeline(<pipeline folder>,
use_lora=True)``, ``DDPOConfig``, ``DDPOTrainer(config, reward_fn, prompt_fn, pipeline)``, one
``trainer.step(epoch, global_step)`` per epoch, and diffalign's ``Evaluator`` on
``trainer.sd_pipeline.sd_pipeline`` (the diffusers pipeline carrying trl's LoRA adapter) at
epoch 0, every ``--eval-every`` epochs and after the last. The output folder gets

* ``metrics.jsonl`` in diffalign's format: one record per epoch with ``epoch``, ``samples_seen``,
  ``seconds`` (that epoch's training wall seconds, sampling + reward + updates, as diffalign
  writes it; ``sampling_seconds`` + ``training_seconds``, its two parts as diffalign splits them),
  ``train_seconds_total`` (cumulative training seconds, evaluation excluded),
  ``eval_seconds`` (at eval epochs), ``reward_mean``, ``reward_std``, ``loss``, ``approx_kl``,
  ``clipfrac``, and at eval epochs ``eval/<set>/shapes-oracle``; epoch 0 is the base model;
* ``trl_settings.json``: every ``DDPOConfig`` field, the LoRA adapter trl built, package versions,
  the diffalign ``--set`` overrides that give the same problem and budget, and the differences
  that remain;
* ``samples/epoch-NNNN.png`` (the Evaluator's grids), ``reward_curve.png``, ``lora/`` (diffusers format).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# What the peer venv holds. torch first (from the machine's local builds: installing it later,
# or letting a dependency pull it, fetches a multi-GB CUDA build from the index).
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
# trl 0.23.1 asks only for accelerate>=1.4, datasets>=3, transformers>=4.56.1 (diffusers and peft
# are extras). This is the set that resolved beside diffalign and was checked to work (import,
# pipeline from a local folder, sampling, training, Evaluator). It is pinned so that a rerun
# months later compares the same trl code, and equal to diffalign's own venv where both overlap:
# - transformers 5.x: the shipped pipeline's tokenizer folder is in transformers-5 format
#   (tokenizer.json only, "backend": "tokenizers"), which transformers 4.x cannot load as a
#   CLIPTokenizer; trl 0.23.1's DDPO code imports and runs under 5.24.
# - diffusers 0.42.1: the version the shipped pipeline was saved with; trl's DDPO pipeline_step
#   (check_inputs, _encode_prompt, image_processor) still works with it.
PINS = [
    "trl==0.23.1",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "diffusers==0.42.1",
    "accelerate==1.15.0",
    "peft==0.21.2",
    "huggingface_hub==2.4.0",
    "datasets==5.2.0",
]
TRL_VERSION = "0.23.1"
SETUP_RECORD = "diffalign-peer-setup.json"
REPO = Path(__file__).resolve().parents[2]
# Copied for the diffalign snapshot install: the sources, without environments and run outputs.
_SNAPSHOT_IGNORE = (
    ".venv*",
    ".git",
    "runs",
    "results",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
)

# diffalign's DDPO defaults that trl must be told (its own defaults differ: clip 1e-4, lr 3e-4,
# fp16, full timesteps, stat min count 16).
DIFFALIGN_DDPO = {
    "clip_range": 1e-2,
    "adv_clip_max": 5.0,
    "stat_buffer_size": 16,
    "stat_min_count": 4,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_weight_decay": 1e-4,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "lora_alpha": 4.0,
}
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # trl's DefaultDDPOStableDiffusionPipeline, = diffalign's


class PeerError(RuntimeError):
    """A setup or run precondition failed; the message says what to do."""


# --------------------------------------------------------------------------------------- setup
def _run(command: list[str], **kwargs) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def setup(venv: Path, repo: Path) -> None:
    """Create (or refresh) the peer venv: torch first, then the pinned trl stack and diffalign."""
    existed = venv_python(venv).exists()
    started = time.perf_counter()
    if not existed:
        _run([sys.executable, "-m", "venv", str(venv)])
    (venv / ".gitignore").write_text("*\n")  # a venv made inside a checkout stays out of git
    python = str(venv_python(venv))
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    _run([*pip, *TORCH])
    with tempfile.TemporaryDirectory(prefix="diffalign-snapshot-") as folder:
        # Installed from a copy: an in-tree build would write build/ and *.egg-info into the repo.
        snapshot = Path(folder) / "diffalign"
        shutil.copytree(repo, snapshot, ignore=shutil.ignore_patterns(*_SNAPSHOT_IGNORE))
        _run([*pip, *TORCH, *PINS, str(snapshot)])
        if existed:  # same version number: make pip replace the old snapshot
            _run([*pip, "--force-reinstall", "--no-deps", str(snapshot)])
    _run([python, "-m", "pip", "check"])
    check = (
        "import importlib.metadata as m, trl, diffalign.evaluation;"
        "from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline;"
        f"assert trl.__version__ == {TRL_VERSION!r}, trl.__version__;"
        "print(' '.join(f'{p}=={m.version(p)}' for p in "
        "['torch','trl','transformers','diffusers','accelerate','peft','diffalign']))"
    )
    _run([python, "-c", check])
    freeze = subprocess.run(
        [python, "-m", "pip", "freeze"], capture_output=True, text=True, check=True
    ).stdout
    record = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "setup_seconds": round(time.perf_counter() - started, 1),
        "pins": [*TORCH, *PINS],
        "diffalign_source": str(repo),
        "diffalign_commit": _git("rev-parse", "HEAD"),
        "diffalign_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "pip_freeze": freeze.splitlines(),
    }
    (venv / SETUP_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"peer venv ready: {venv} (diffalign snapshot of {repo} at {record['diffalign_commit']}); "
        f"run: {Path(__file__).name} --venv {venv} --seed 0 ..."
    )


def ensure_in_venv(venv: Path) -> None:
    """Re-execute this script with the peer venv's python unless it already is that python."""
    if Path(sys.prefix).resolve() == venv.resolve():
        return
    python = venv_python(venv)
    if not python.exists():
        raise PeerError(
            f"no peer venv at {venv}: create it first with\n    python {__file__} --setup --venv {venv}"
        )
    if os.environ.get("DIFFALIGN_PEER_REEXEC"):
        raise PeerError(f"re-executed with {python} but sys.prefix is {sys.prefix}; is {venv} a venv?")
    os.environ["DIFFALIGN_PEER_REEXEC"] = "1"
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


# ----------------------------------------------------------------------------------------- run
def diffalign_overrides(args: argparse.Namespace, sample_batch: int) -> list[str]:
    """The ``diffalign train --set`` overrides for the same problem, budget and update schedule."""
    d = DIFFALIGN_DDPO
    return [
        "method=ddpo",
        "exploration=none",
        "model=shapes",
        "reward=shapes-oracle",
        f"prompts={args.prompts}",
        f"seed={args.seed}",
        f"epochs={args.epochs}",
        "mixed_precision=no",
        f"sample.num_steps={args.num_steps}",
        f"sample.eta={args.eta}",
        f"sample.guidance_scale={args.guidance_scale}",
        "sample.negative_prompt=''",
        f"sample.batch_size={sample_batch}",
        f"sample.num_batches_per_epoch={args.images_per_epoch // sample_batch}",
        f"sample.images_per_prompt={args.images_per_prompt}",
        "sample.shared_initial_noise=false",
        f"train.batch_size={args.train_batch_size}",
        f"train.gradient_accumulation_steps={args.gradient_accumulation_steps}",
        f"train.learning_rate={args.learning_rate}",
        f"train.timestep_fraction={args.timestep_fraction}",
        "train.inner_epochs=1",
        f"train.max_grad_norm={d['max_grad_norm']}",
        f"train.adam_weight_decay={d['adam_weight_decay']}",
        f"ddpo.clip_range={args.clip_range}",
        f"ddpo.adv_clip_max={d['adv_clip_max']}",
        "ddpo.per_prompt_stat_tracking=true",
        f"ddpo.stat_buffer_size={d['stat_buffer_size']}",
        f"ddpo.stat_min_count={args.stat_min_count}",
        "lora.enabled=true",
        f"lora.rank={args.lora_rank}",
        f"lora.alpha={d['lora_alpha']}",
        f"lora.init={'gaussian' if args.lora_init == 'trl' else 'default'}",
        f"eval.every={args.eval_every}",
        f"eval.size={args.eval_size}",
        f"eval.prompt_sets=[{', '.join(args.eval_sets)}]",
        "eval.rewards=[shapes-oracle]",
    ]


def run(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import warnings
    from importlib import metadata

    import trl
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from diffalign import pipeline as diffalign_pipeline
    from diffalign import plots, rewards
    from diffalign import prompts as prompt_sets
    from diffalign.evaluation import Evaluator
    from diffalign.shapes import assets

    if trl.__version__ != TRL_VERSION:
        raise PeerError(
            f"this venv has trl {trl.__version__}, the comparison is with trl {TRL_VERSION}; rerun --setup"
        )
    output = Path(args.output or f"results/peers/trl-ddpo-seed{args.seed}")
    if output.exists() and any(output.iterdir()):
        if not args.overwrite:
            raise PeerError(f"{output} is not empty; choose another --output or pass --overwrite")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)

    sample_batch = min(args.sample_batch_size, args.images_per_epoch)
    problems = []
    if args.images_per_epoch % sample_batch:
        problems.append(
            f"--images-per-epoch {args.images_per_epoch} is not a multiple of the sampling batch {sample_batch}"
        )
    if sample_batch % args.images_per_prompt:
        problems.append(
            f"the sampling batch {sample_batch} is not a multiple of --images-per-prompt {args.images_per_prompt}"
        )
    if sample_batch % args.train_batch_size:
        problems.append(
            f"the sampling batch {sample_batch} is not a multiple of --train-batch-size {args.train_batch_size}"
        )
    if problems:
        raise PeerError("; ".join(problems))

    prompt_list = prompt_sets.load_prompts(args.prompts)
    oracle = rewards.build("shapes-oracle")
    epoch_rewards: list[torch.Tensor] = []

    def reward_fn(images, prompts, metadata):
        """trl calls this per sampling batch: images [B,3,H,W] in [0,1] (output_type="pt"), prompts a tuple."""
        values = rewards.checked_call(oracle, images.float().clamp(0, 1), list(prompts)).float().cpu()
        epoch_rewards.append(values)
        return values, {}

    class SeededPrompts:
        """trl calls prompt_fn() once per image. Each drawn prompt is served ``images_per_prompt``
        times in a row (groups never straddle a sampling batch, as in diffalign's
        ``sample.images_per_prompt``); draws come from a generator seeded by --seed."""

        def __init__(self, seed: int, repeat: int):
            self.generator = torch.Generator().manual_seed(seed)
            self.repeat, self.left, self.current = repeat, 0, ""

        def __call__(self):
            if self.left == 0:
                self.current = prompt_sets.draw(prompt_list, 1, self.generator)[0]
                self.left = self.repeat
            self.left -= 1
            return self.current, {}

    class RankedPipeline(DefaultDDPOStableDiffusionPipeline):
        """trl's pipeline hard-codes LoRA r=4, alpha=4, Gaussian A (std 1/r): used as is for rank 4.
        Other ranks (or --lora-init peft) replace only the LoraConfig."""

        def __init__(self, *a, rank: int, init: str, **kw):
            super().__init__(*a, **kw)
            self.rank, self.init = rank, init

        def get_trainable_layers(self):
            if not self.use_lora or (self.rank == 4 and self.init == "trl"):
                return super().get_trainable_layers()
            from peft import LoraConfig

            self.sd_pipeline.unet.add_adapter(
                LoraConfig(
                    r=self.rank,
                    lora_alpha=DIFFALIGN_DDPO["lora_alpha"],
                    init_lora_weights="gaussian" if self.init == "trl" else True,
                    target_modules=LORA_TARGETS,
                )
            )
            for parameter in self.sd_pipeline.unet.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.to(torch.float32)
            return self.sd_pipeline.unet

    # trl's pipeline logs through accelerate's logger when the folder has no LoRA weights, which
    # raises unless accelerate's state exists: create it first (the trainer's Accelerator reuses it).
    PartialState()
    warnings.filterwarnings("ignore", message="DDPOTrainer is deprecated")
    ddpo_pipeline = RankedPipeline(
        str(assets.PIPELINE_DIR), use_lora=True, rank=args.lora_rank, init=args.lora_init
    )
    config = DDPOConfig(
        exp_name="diffalign-peer-trl-ddpo",
        seed=args.seed,
        log_with=None,
        num_epochs=args.epochs,
        save_freq=args.epochs + 1,  # no accelerate checkpoints (diffalign's `seconds` excludes saving too)
        mixed_precision="no",  # trl's default is fp16; diffalign's is no
        allow_tf32=False,
        sample_num_steps=args.num_steps,
        sample_eta=args.eta,
        sample_guidance_scale=args.guidance_scale,
        sample_batch_size=sample_batch,
        sample_num_batches_per_epoch=args.images_per_epoch // sample_batch,
        train_batch_size=args.train_batch_size,
        train_gradient_accumulation_steps=args.gradient_accumulation_steps,
        train_learning_rate=args.learning_rate,
        train_adam_beta1=DIFFALIGN_DDPO["adam_beta1"],
        train_adam_beta2=DIFFALIGN_DDPO["adam_beta2"],
        train_adam_weight_decay=DIFFALIGN_DDPO["adam_weight_decay"],
        train_adam_epsilon=DIFFALIGN_DDPO["adam_epsilon"],
        train_max_grad_norm=DIFFALIGN_DDPO["max_grad_norm"],
        train_num_inner_epochs=1,
        train_cfg=True,
        train_adv_clip_max=DIFFALIGN_DDPO["adv_clip_max"],
        train_clip_range=args.clip_range,
        train_timestep_fraction=args.timestep_fraction,
        per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=DIFFALIGN_DDPO["stat_buffer_size"],
        per_prompt_stat_tracking_min_count=args.stat_min_count,
        negative_prompts="",
    )
    trainer = DDPOTrainer(config, reward_fn, SeededPrompts(args.seed, args.images_per_prompt), ddpo_pipeline)
    sd = trainer.sd_pipeline.sd_pipeline  # the diffusers StableDiffusionPipeline, now with trl's adapter
    sd.set_progress_bar_config(disable=True)

    # trl reports loss/approx_kl/clipfrac only through accelerator.log (no tracker here): keep them.
    logged: list[dict] = []
    original_log = trainer.accelerator.log

    def log(values, step=None, log_kwargs=None):
        logged.append(
            {
                k: float(torch.as_tensor(v).detach())
                for k, v in values.items()
                if k in ("loss", "approx_kl", "clipfrac")
            }
        )
        return original_log(values, step=step, log_kwargs=log_kwargs or {})

    trainer.accelerator.log = log

    # diffalign splits an epoch's seconds into sampling (with rewarding) and training; time trl's
    # two sampling-side calls the same way (timing only, the calls are unchanged).
    sampling_clock = [0.0]

    def timed(function):
        def wrapper(*a, **kw):
            started = time.perf_counter()
            try:
                return function(*a, **kw)
            finally:
                sampling_clock[0] += time.perf_counter() - started

        return wrapper

    trainer._generate_samples = timed(trainer._generate_samples)
    trainer.compute_rewards = timed(trainer.compute_rewards)

    evaluator = Evaluator(
        sd,
        prompt_set_names=list(args.eval_sets),
        size=args.eval_size,
        rewards=[oracle],
        num_steps=args.num_steps,
        guidance_scale=args.guidance_scale,
        negative_prompt="",
        seed=args.seed,
        grid_folder=output / "samples",
        grid_size=8,
    )
    lora_parameters = {name: p for name, p in sd.unet.named_parameters() if p.requires_grad}
    a_std = float(
        np.mean([p.detach().float().std().item() for n, p in lora_parameters.items() if "lora_A" in n])
    )
    b_abs = max(p.detach().abs().max().item() for n, p in lora_parameters.items() if "lora_B" in n)
    overrides = diffalign_overrides(args, sample_batch)
    versions = {
        name: metadata.version(name)
        for name in ("torch", "trl", "transformers", "diffusers", "accelerate", "peft", "diffalign")
    }
    setup_record = Path(sys.prefix) / SETUP_RECORD
    setup_info = json.loads(setup_record.read_text()) if setup_record.is_file() else {}
    settings = {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "trl_ddpo_config": {k: v for k, v in config.to_dict().items()},
        "lora": {
            "rank": args.lora_rank,
            "alpha": DIFFALIGN_DDPO["lora_alpha"],
            "targets": LORA_TARGETS,
            "init": (
                "trl: peft init_lora_weights='gaussian', A ~ N(0, (1/r)^2), B = 0"
                if args.lora_init == "trl"
                else "peft default (diffalign's): A kaiming-uniform(a=sqrt 5), B = 0"
            ),
            "measured_A_std_mean": a_std,
            "max_abs_B": b_abs,
            "trainable_parameters": int(sum(p.numel() for p in lora_parameters.values())),
        },
        "prompts": {
            "set": args.prompts,
            "count": len(prompt_list),
            "images_per_prompt": args.images_per_prompt,
            "generator_seed": args.seed,
        },
        "reward": "shapes-oracle",
        "pipeline_folder": str(assets.PIPELINE_DIR),
        "evaluation": {
            "prompt_sets": list(args.eval_sets),
            "size": args.eval_size,
            "every": args.eval_every,
            "eta": 0.0,
            "reward": "shapes-oracle",
            "seed": args.seed,
        },
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "diffalign_snapshot": {
            k: setup_info.get(k)
            for k in ("diffalign_source", "diffalign_commit", "diffalign_dirty", "created")
        },
        "diffalign_equivalent": {
            "overrides": overrides,
            "command": "diffalign train " + " ".join(f'--set "{o}"' for o in overrides),
        },
        "remaining_differences": [
            (
                "LoRA A init: none left when diffalign runs with the lora.init override above (gaussian = trl's "
                "N(0, 1/r^2); diffalign's default is peft's Kaiming-uniform, about 4x smaller at r=4, which scales the "
                "early updates of B); B = 0 in both, so both start at the base model"
            ),
            (
                "random streams: trl samples noise from torch's global RNG seeded once (set_seed(seed, "
                "device_specific)); diffalign seeds a generator per (seed, epoch, process); prompts here come from "
                "their own seeded generator"
            ),
            (
                "per-prompt statistics are keyed by the prompt decoded from its token ids (trl) vs the prompt text "
                "(diffalign)"
            ),
            "no 'ratio' metric: trl does not report it",
        ],
    }
    (output / "trl_settings.json").write_text(json.dumps(settings, indent=1) + "\n")

    metrics_path = output / "metrics.jsonl"
    history: list[dict] = []

    def write(record: dict) -> None:
        history.append(record)
        with metrics_path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")

    def evaluate(record: dict, epoch: int) -> None:
        started = time.perf_counter()
        record.update(evaluator.run(sd, epoch, trainer.accelerator))
        record["eval_seconds"] = time.perf_counter() - started

    base = {"epoch": 0, "samples_seen": 0}
    evaluate(base, 0)
    write(base)
    print(json.dumps(base), flush=True)
    global_step, seen, total = 0, 0, 0.0
    for epoch in range(args.epochs):
        epoch_rewards.clear()
        logged.clear()
        sampling_clock[0] = 0.0
        started = time.perf_counter()
        global_step = trainer.step(epoch, global_step)
        seconds = time.perf_counter() - started
        total += seconds
        values = torch.cat(epoch_rewards)
        seen += int(values.numel())
        done = epoch + 1
        record = {
            "epoch": done,
            "reward_mean": values.mean().item(),
            "reward_std": values.std(unbiased=False).item(),
            "samples": int(values.numel()),
        }
        for key in ("loss", "approx_kl", "clipfrac"):
            items = [entry[key] for entry in logged if key in entry]
            if items:
                record[key] = float(np.mean(items))
        record.update(
            {
                "optimizer_steps": global_step,
                "samples_seen": seen,
                "seconds": seconds,
                "sampling_seconds": sampling_clock[0],
                "training_seconds": seconds - sampling_clock[0],
                "train_seconds_total": total,
            }
        )
        if done % args.eval_every == 0 or done == args.epochs:
            evaluate(record, done)
        write(record)
        print(json.dumps(record), flush=True)

    diffalign_pipeline.save_lora(sd.unet, output / "lora")
    eval_keys = sorted({key for record in history for key in record if key.startswith("eval/")})
    plots.save_curves(
        history,
        ["reward_mean", *eval_keys],
        output / "reward_curve.png",
        title=f"trl {trl.__version__} DDPOTrainer on shapes — shapes-oracle",
    )
    print(
        f"wrote {metrics_path}; the same problem in diffalign:\n    {settings['diffalign_equivalent']['command']}"
    )


def check() -> None:
    """trl's sampler and diffalign's define the same policy: with η = 0 the same images from the same
    x_T, with η = 1 diffalign's log-prob of every step of a trl chain equals trl's."""
    import torch
    from accelerate import PartialState
    from trl.models.modeling_sd_base import pipeline_step

    from diffalign import pipeline as diffalign_pipeline
    from diffalign.sampling import ddim_step_with_logprob, guided_noise, initial_latents, sample

    PartialState()
    pipe = diffalign_pipeline.load("shapes")
    prompts = ["two red circles", "three blue squares"]
    x_t = initial_latents(pipe, len(prompts), torch.Generator().manual_seed(0))

    def embed(texts):
        ids = pipe.tokenizer(
            texts,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=pipe.tokenizer.model_max_length,
        ).input_ids
        return pipe.text_encoder(ids)[0]

    with torch.no_grad():
        conditional, unconditional = embed(prompts), embed([""]).repeat(len(prompts), 1, 1)
        common = {
            "prompt_embeds": conditional,
            "negative_prompt_embeds": unconditional,
            "num_inference_steps": 20,
            "guidance_scale": 5.0,
            "output_type": "pt",
        }
        ours = sample(pipe, prompts, num_steps=20, guidance_scale=5.0, eta=0.0, latents=x_t.clone())
        theirs = pipeline_step(pipe, eta=0.0, latents=x_t.clone(), **common)
        image_gap = (ours.images - theirs.images).abs().max().item()
        torch.manual_seed(1)
        theirs = pipeline_step(pipe, eta=1.0, latents=x_t.clone(), **common)
        scales = torch.full((len(prompts),), 5.0)
        log_prob_gap = 0.0
        for i, t in enumerate(pipe.scheduler.timesteps):
            noise = guided_noise(pipe.unet, theirs.latents[i], t, conditional, unconditional, scales)
            _, log_prob = ddim_step_with_logprob(
                pipe.scheduler, noise, t, theirs.latents[i], eta=1.0, prev_sample=theirs.latents[i + 1]
            )
            log_prob_gap = max(log_prob_gap, (log_prob - theirs.log_probs[i]).abs().max().item())
    print(
        f"eta=0 images, max |diffalign - trl| = {image_gap:.3g}; "
        f"eta=1 per-step log-probs of a trl chain, max |diffalign - trl| = {log_prob_gap:.3g}"
    )
    if image_gap > 1e-5 or log_prob_gap > 1e-4:
        raise PeerError("trl's sampler and diffalign's differ: the comparison is not of the same policy")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--setup", action="store_true", help="create or refresh the peer venv, then exit")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check in the peer venv that trl's sampler and log-probs equal diffalign's, then exit",
    )
    parser.add_argument("--venv", type=Path, default=Path(".venv-peers/trl"), help="the peer venv")
    parser.add_argument("--repo", type=Path, default=REPO, help="(--setup) the diffalign checkout to install")
    run_group = parser.add_argument_group(
        "run (defaults: diffalign's DDPO defaults, on the peer problem: shapes-count prompts, shapes-oracle reward)"
    )
    run_group.add_argument(
        "--seed", type=int, default=0, help="trl seed; prompt and eval seed; diffalign seed"
    )
    run_group.add_argument("--epochs", type=int, default=20, help="trainer.step calls; diffalign epochs")
    run_group.add_argument(
        "--images-per-epoch",
        type=int,
        default=32,
        help="diffalign: sample.batch_size x sample.num_batches_per_epoch",
    )
    run_group.add_argument(
        "--sample-batch-size",
        type=int,
        default=16,
        help="trl sample_batch_size (capped at the images per epoch)",
    )
    run_group.add_argument(
        "--images-per-prompt",
        type=int,
        default=4,
        help="consecutive images per drawn prompt (1 = trl's usual prompt_fn)",
    )
    run_group.add_argument(
        "--train-batch-size", type=int, default=4, help="trl train_batch_size; diffalign train.batch_size"
    )
    run_group.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=1,
        help="trl train_gradient_accumulation_steps; diffalign train.gradient_accumulation_steps",
    )
    run_group.add_argument(
        "--learning-rate",
        type=float,
        default=1e-3,
        help="trl train_learning_rate; diffalign train.learning_rate",
    )
    run_group.add_argument(
        "--lora-rank", type=int, default=4, help="LoRA r (alpha stays 4, as trl and diffalign)"
    )
    run_group.add_argument(
        "--lora-init",
        choices=["trl", "peft"],
        default="trl",
        help="trl: Gaussian A with std 1/r (trl, ddpo-pytorch; diffalign lora.init=gaussian); "
        "peft: peft's Kaiming-uniform (diffalign's default lora.init=default)",
    )
    run_group.add_argument(
        "--num-steps", type=int, default=20, help="trl sample_num_steps; diffalign sample.num_steps"
    )
    run_group.add_argument("--eta", type=float, default=1.0, help="trl sample_eta; diffalign sample.eta")
    run_group.add_argument(
        "--guidance-scale",
        type=float,
        default=5.0,
        help="trl sample_guidance_scale; diffalign sample.guidance_scale",
    )
    run_group.add_argument(
        "--timestep-fraction",
        type=float,
        default=0.5,
        help="trl train_timestep_fraction; diffalign train.timestep_fraction",
    )
    run_group.add_argument(
        "--clip-range", type=float, default=1e-2, help="trl train_clip_range; diffalign ddpo.clip_range"
    )
    run_group.add_argument(
        "--stat-min-count",
        type=int,
        default=4,
        help="trl per_prompt_stat_tracking_min_count; diffalign ddpo.stat_min_count",
    )
    run_group.add_argument(
        "--prompts", default="shapes-count", help="diffalign prompt set drawn by prompt_fn"
    )
    run_group.add_argument(
        "--eval-every", type=int, default=2, help="diffalign eval.every (also epoch 0 and the last)"
    )
    run_group.add_argument("--eval-size", type=int, default=64, help="diffalign eval.size")
    run_group.add_argument(
        "--eval-sets",
        nargs="+",
        default=["shapes-count", "shapes-heldout"],
        help="diffalign eval.prompt_sets, in this order",
    )
    run_group.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    run_group.add_argument(
        "--output", type=Path, default=None, help="default ./results/peers/trl-ddpo-seed<N>/"
    )
    run_group.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.setup:
            setup(args.venv, args.repo.resolve())
            return 0
        ensure_in_venv(args.venv)
        if args.check:
            check()
            return 0
        run(args)
    except (PeerError, subprocess.CalledProcessError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
