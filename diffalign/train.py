"""The training loop shared by every method: devices, precision and processes through accelerate,
metrics, sample grids, atomic checkpoints and exact resumption.

Every epoch's randomness (prompt draws, initial noise, DDIM noise, shuffles) comes from a
generator seeded by (seed, epoch, process), so a run resumed from the checkpoint of epoch k
repeats exactly what the uninterrupted run did after epoch k.
"""

from __future__ import annotations

import importlib.util
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from diffalign import checkpoint, outputs, pipeline, plots, rewards
from diffalign import prompts as prompt_sets
from diffalign.config import TrainConfig, load_config, resume_changes
from diffalign.diffexp import DiffExp
from diffalign.errors import DiffalignError
from diffalign.evaluation import Evaluator
from diffalign.optim import METHOD_CLASSES
from diffalign.optim.base import TrainContext


class RunExistsError(DiffalignError, RuntimeError):
    """The output folder already holds a run; resuming or a new folder must be chosen explicitly."""


@dataclass
class TrainResult:
    """Where a finished run put its outputs, and its per-epoch metrics."""

    output_dir: Path
    history: list[dict]
    lora_dir: Path | None
    main_process: bool = True


def epoch_seed(seed: int, epoch: int, process: int) -> int:
    """The seed of one epoch on one process: independent streams that resumption can recreate."""
    return (seed * 1_000_003 + epoch * 1_009 + process * 7_919) % (2**63)


def _tensorboard_available() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def build_context(config: TrainConfig, reward: rewards.Reward | None = None) -> TrainContext:
    """Everything a method trains with: accelerator, pipeline with adapter, optimizer, reward, prompts.

    ``train`` calls this; so do benchmarks that time one method's epoch on its own.
    """
    method_class = METHOD_CLASSES[config.method]
    accelerator = Accelerator(
        # Without a GPU, accelerate only sets up multi-process (gloo) training when told it is on CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=method_class.accumulation_steps(config),
        log_with="tensorboard" if config.tensorboard and _tensorboard_available() else None,
        project_dir=config.output_dir,
    )
    set_seed(config.seed)  # LoRA's random down-projection init
    pipe = pipeline.load(config.model, seed=config.seed)
    pipe.to(accelerator.device)
    pipeline.enable_memory_savers(
        pipe, xformers=config.xformers, gradient_checkpointing=config.gradient_checkpointing
    )
    if config.lora.enabled:
        pipeline.add_lora(
            pipe, rank=config.lora.rank, alpha=config.lora.alpha, target_modules=tuple(config.lora.target_modules)
        )
    else:
        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        pipe.unet.requires_grad_(True)
    parameters = [p for p in pipe.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters,
        lr=config.train.learning_rate,
        betas=(config.train.adam_beta1, config.train.adam_beta2),
        weight_decay=config.train.adam_weight_decay,
        eps=config.train.adam_epsilon,
    )
    unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
    reward = reward if reward is not None else rewards.build(config.reward, **config.reward_options)
    if isinstance(reward, torch.nn.Module):
        reward.to(accelerator.device)
    prompt_list = prompt_sets.load_prompts(config.prompts)
    exploration = None
    if config.exploration == "diffexp":
        exploration = DiffExp(pipe, config.diffexp, config.sample.guidance_scale, config.sample.num_steps)
        exploration.check_prompts(prompt_list)
    return TrainContext(pipe, unet, optimizer, accelerator, reward, prompt_list, parameters, exploration)


def train(
    config: TrainConfig, *, reward: rewards.Reward | None = None, resume: bool = False, progress: bool = True
) -> TrainResult:
    """Run ``config.method`` for ``config.epochs`` epochs (continuing the last checkpoint if ``resume``).

    ``reward`` replaces the registry reward named in the config: the way to train on a reward
    written in user code.
    """
    method_class = METHOD_CLASSES[config.method]
    output = Path(config.output_dir)
    checkpoints = output / "checkpoints"
    previous = checkpoint.latest(checkpoints) if checkpoints.is_dir() else None
    if previous is not None and not resume:
        raise RunExistsError(
            f"{output} already holds a run (checkpoint {previous.name}). Pass --resume to continue it, "
            "or choose another output_dir; nothing was changed."
        )
    if resume and previous is None:
        raise checkpoint.CheckpointError(f"--resume given but {checkpoints} has no checkpoint to resume from")
    changes: dict[str, list] = {}
    if resume:
        if not (output / "config.yaml").is_file():
            raise checkpoint.CheckpointError(
                f"{output} has a checkpoint but no config.yaml, so its settings are unknown and --resume "
                "cannot check that it continues the same experiment; restore config.yaml from a copy"
            )
        changes = resume_changes(load_config(output / "config.yaml"), config, output)
    else:
        outputs.check_new_run_folder(output)

    context = build_context(config, reward)
    accelerator, pipe, optimizer, reward = context.accelerator, context.pipe, context.optimizer, context.reward
    method = method_class(context, config)
    # Every process has passed the checks above before the main process writes anything.
    accelerator.wait_for_everyone()

    history: list[dict] = []
    start_epoch = 0
    main = accelerator.is_main_process
    if main:  # what interrupted writes of an earlier attempt left behind
        outputs.remove_debris(output)
        checkpoint.remove_debris(checkpoints)
    if previous is not None:
        state = checkpoint.load(previous, unet=pipe.unet, lora=config.lora.enabled, optimizer=optimizer)
        start_epoch, history = state["epoch"], state["history"]
        method.load_state_dict(state["method"])
        processes = [state.get("num_processes", 1), accelerator.num_processes]
        if processes[0] != processes[1]:
            changes["processes"] = processes
            if main:
                per_process = config.sample.batch_size * config.sample.num_batches_per_epoch
                warnings.warn(
                    f"resuming the run in {output} with {processes[1]} processes where it ran with {processes[0]}: "
                    f"each epoch now samples {per_process * processes[1]} images instead of "
                    f"{per_process * processes[0]}, and the remaining epochs draw other random streams than an "
                    "uninterrupted run would (the change is recorded in resumes.jsonl)",
                    stacklevel=2,
                )
        if main:
            record = {"epoch": start_epoch, "changes": changes, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            with (output / "resumes.jsonl").open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(record) + "\n")
    metrics_path = output / "metrics.jsonl"
    eval_rewards = [reward] + [rewards.build(name) for name in config.eval.rewards if name != reward.name]
    evaluator = Evaluator(
        pipe,
        prompt_set_names=config.eval.prompt_sets or [config.prompts],
        size=config.eval.size,
        rewards=eval_rewards,
        num_steps=config.sample.num_steps,
        guidance_scale=config.sample.guidance_scale,
        negative_prompt=config.sample.negative_prompt,
        seed=config.seed,
        grid_folder=output / "samples",
        grid_size=config.eval.grid_size,
    )
    if main:
        output.mkdir(parents=True, exist_ok=True)
        outputs.write_text(output / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        # Metrics logged after the last checkpoint belong to epochs that will be redone.
        outputs.write_text(metrics_path, "".join(json.dumps(record) + "\n" for record in history))
    if accelerator.log_with:
        accelerator.init_trackers("diffalign")
    if start_epoch == 0:
        # Epoch 0 is the base model: the "before" of every before/after comparison.
        history.append({"epoch": 0, "samples_seen": 0})
        if main:
            history[0].update(evaluator.run(pipe, 0, accelerator))
            with metrics_path.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(history[0]) + "\n")

    bar = tqdm(range(start_epoch, config.epochs), desc=f"{config.method} epochs", disable=not (progress and main))
    for epoch in bar:
        generator = torch.Generator().manual_seed(epoch_seed(config.seed, epoch, accelerator.process_index))
        started = time.perf_counter()
        metrics = method.run_epoch(epoch, generator)
        done = epoch + 1
        seen = history[-1]["samples_seen"] + metrics["samples"]
        record = {"epoch": done, **metrics, "samples_seen": seen, "seconds": time.perf_counter() - started}
        if main and (done % config.eval.every == 0 or done == config.epochs):
            record.update(evaluator.run(pipe, done, accelerator))
        history.append(record)
        bar.set_postfix(reward=f"{record['reward_mean']:.4g}", loss=f"{record['loss']:.3g}")
        if main:
            with metrics_path.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(record) + "\n")
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=done)
        if done % config.save_every == 0 or done == config.epochs:
            accelerator.wait_for_everyone()
            if main:
                checkpoint.save(
                    checkpoints,
                    epoch=done,
                    unet=pipe.unet,
                    lora=config.lora.enabled,
                    optimizer=optimizer,
                    trainer_state={"history": history, "num_processes": accelerator.num_processes},
                    method_state=method.state_dict(),
                    keep=config.keep_checkpoints,
                )
    accelerator.wait_for_everyone()
    lora_dir = None
    if main:
        if config.lora.enabled:
            lora_dir = output / "lora"
            pipeline.save_lora(pipe.unet, lora_dir)
        else:
            pipe.unet.save_pretrained(output / "unet")
        eval_keys = sorted({key for record in history for key in record if key.startswith("eval/")})
        plots.save_curves(
            history, ["reward_mean", *eval_keys], output / "reward_curve.png",
            title=f"{config.method} on {config.model} — {config.reward}",
        )
    accelerator.end_training()
    return TrainResult(output, history, lora_dir, main)
