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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from diffalign import checkpoint, families, optim, outputs, pipeline, plots, rewards
from diffalign import prompts as prompt_sets
from diffalign.config import TrainConfig, load_config, resume_changes
from diffalign.diffexp import DiffExp
from diffalign.errors import DiffalignError
from diffalign.evaluation import Evaluator
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
    seconds: float | None = None  # wall-clock seconds of this invocation, evaluation included

    def summary(self, reward: str | None) -> str:
        """Before -> after of every evaluated metric (the base model's record against the last
        evaluation), the time, and where the grids and curves are: what ``diffalign train`` prints
        at the end. ``reward`` is the training reward's name, marked as such (None for a method
        that trains on preference data)."""
        evaluated = [record for record in self.history if any(key.startswith("eval/") for key in record)]
        lines = []
        if len(evaluated) >= 2 and evaluated[0].get("epoch") == 0:
            first, last = evaluated[0], evaluated[-1]
            lines.append(f"before -> after (epoch 0 -> {last['epoch']}, fixed evaluation noise):")
            keys = [key for key in first if key.startswith("eval/") and key in last]
            # The training reward first (the proxy it optimised), then what was scored beside it.
            keys.sort(key=lambda key: (key.rsplit("/", 1)[1] != reward, key))
            width = max(len(key) for key in keys)
            for key in keys:
                role = "(training reward)" if key.rsplit("/", 1)[1] == reward else "(scored, not trained on)"
                change = last[key] - first[key]
                lines.append(f"  {key:<{width}}  {first[key]:.3f} -> {last[key]:.3f} ({change:+.3f})  {role}")
        if self.seconds is not None:
            took = f"{self.seconds:.0f} s" if self.seconds < 120 else f"{self.seconds / 60:.1f} min"
            lines.append(f"time: {took}, evaluation included")
        out = self.output_dir
        lines.append(
            f"grids: {out / 'samples'} (epoch-NNNN.png, one per evaluation); curves: {out / 'reward_curve.png'}"
        )
        # A full fine-tune saves the trained denoiser: a flow model's transformer, or a UNet.
        whole = out / "transformer" if (out / "transformer").is_dir() else out / "unet"
        weights = self.lora_dir if self.lora_dir is not None else whole
        lines.append(
            f"metrics: {out / 'metrics.jsonl'}; weights: {weights}; checkpoints: {out / 'checkpoints'}"
        )
        return "\n".join(lines)


def epoch_seed(seed: int, epoch: int, process: int) -> int:
    """The seed of one epoch on one process: independent streams that resumption can recreate."""
    return (seed * 1_000_003 + epoch * 1_009 + process * 7_919) % (2**63)


def _tensorboard_available() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def build_context(config: TrainConfig, reward: rewards.Reward | None = None) -> TrainContext:
    """Everything a method trains with: accelerator, pipeline with adapter, optimizer, reward, prompts.

    ``train`` calls this; so do benchmarks that time one method's epoch on its own.
    """
    method_class = optim.get(config.method).cls
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
            pipe,
            rank=config.lora.rank,
            alpha=config.lora.alpha,
            target_modules=tuple(config.lora.target_modules),
            init=config.lora.init,
        )
    else:
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
        families.denoiser(pipe).requires_grad_(True)
    denoiser = families.denoiser(pipe)
    parameters = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters,
        lr=config.train.learning_rate,
        betas=(config.train.adam_beta1, config.train.adam_beta2),
        weight_decay=config.train.adam_weight_decay,
        eps=config.train.adam_epsilon,
    )
    unet, optimizer = accelerator.prepare(denoiser, optimizer)
    reward = reward if reward is not None else rewards.build(config.reward, **config.reward_options)
    if isinstance(reward, torch.nn.Module):
        reward.to(accelerator.device)
    prompt_list = prompt_sets.load_prompts(config.prompts)
    exploration = None
    if config.exploration == "diffexp":
        exploration = DiffExp(pipe, config.diffexp, config.sample.guidance_scale, config.sample.num_steps)
        exploration.check_prompts(prompt_list)
    return TrainContext(pipe, unet, optimizer, accelerator, reward, prompt_list, parameters, exploration)


def open_run_folder(
    output: Path, resume: bool, changes_since: Callable[[Path], dict[str, list]]
) -> tuple[Path | None, dict[str, list]]:
    """Check ``output`` for a new run, or for the run ``resume`` continues, before anything is
    written: returns the checkpoint to continue from (None for a new run) and the settings the
    resumed run changes, ``changes_since(output / "config.yaml")`` (which refuses forbidden ones).
    Shared by every run folder diffalign writes (``train``, ``personalize``)."""
    checkpoints = output / "checkpoints"
    previous = checkpoint.latest(checkpoints) if checkpoints.is_dir() else None
    if previous is not None and not resume:
        raise RunExistsError(
            f"{output} already holds a run (checkpoint {previous.name}). Pass --resume to continue it, "
            "or choose another output_dir; nothing was changed."
        )
    if resume and previous is None:
        raise checkpoint.CheckpointError(f"--resume given but {checkpoints} has no checkpoint to resume from")
    if not resume:
        outputs.check_new_run_folder(output)
        return None, {}
    if not (output / "config.yaml").is_file():
        raise checkpoint.CheckpointError(
            f"{output} has a checkpoint but no config.yaml, so its settings are unknown and --resume "
            "cannot check that it continues the same experiment; restore config.yaml from a copy"
        )
    return previous, changes_since(output / "config.yaml")


class Trainer:
    """One training run, step by step: what ``train`` loops over, for studies that need each epoch.

    ``Trainer(config)`` checks the output folder, builds the pipeline, method and evaluator and
    (with ``resume=True``) restores the last checkpoint; ``evaluate()`` scores the fixed
    evaluation samples and ``run_epoch()`` trains one epoch and returns its record, with the
    seconds spent sampling (and rewarding) and training in ``sampling_seconds`` and
    ``training_seconds``; ``finish()`` writes the adapter and the curves. Records are appended
    to ``metrics.jsonl`` and checkpoints written as ``train`` does, so a run driven by hand
    resumes like any other.

        trainer = Trainer(load_config(None, ["method=grpo", "output_dir=runs/x"]))
        trainer.evaluate()                       # epoch 0: the base model
        while trainer.epoch < trainer.config.epochs:
            record = trainer.run_epoch()
        result = trainer.finish()
    """

    def __init__(self, config: TrainConfig, *, reward: rewards.Reward | None = None, resume: bool = False):
        self.config = config
        self.output = output = Path(config.output_dir)
        self.checkpoints = checkpoints = output / "checkpoints"
        previous, changes = open_run_folder(
            output, resume, lambda saved: resume_changes(load_config(saved), config, output)
        )

        self.context = context = build_context(config, reward)
        self.accelerator = accelerator = context.accelerator
        self.pipe, self.reward = context.pipe, context.reward
        self.method = optim.get(config.method).cls(context, config)
        # Every process has passed the checks above before the main process writes anything.
        accelerator.wait_for_everyone()

        self.history: list[dict] = []
        self.epoch = 0
        self.main = main = accelerator.is_main_process
        if main:  # what interrupted writes of an earlier attempt left behind
            outputs.remove_debris(output)
            checkpoint.remove_debris(checkpoints)
        if previous is not None:
            self._restore(previous, changes)
        self.metrics_path = output / "metrics.jsonl"
        eval_rewards = [self.reward] + [
            rewards.build(name) for name in config.eval.rewards if name != self.reward.name
        ]
        self.evaluator = Evaluator(
            self.pipe,
            prompt_set_names=config.eval.prompt_sets or [config.prompts],
            size=config.eval.size,
            rewards=eval_rewards,
            num_steps=config.eval.num_steps or config.sample.num_steps,
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
            outputs.write_text(
                self.metrics_path, "".join(json.dumps(record) + "\n" for record in self.history)
            )
        if accelerator.log_with:
            accelerator.init_trackers("diffalign")

    def _restore(self, previous: Path, changes: dict[str, list]) -> None:
        config, accelerator = self.config, self.accelerator
        state = checkpoint.load(
            previous,
            unet=families.denoiser(self.pipe),
            lora=config.lora.enabled,
            optimizer=self.context.optimizer,
        )
        self.epoch, self.history = state["epoch"], state["history"]
        self.method.load_state_dict(state["method"])
        processes = [state.get("num_processes", 1), accelerator.num_processes]
        if processes[0] != processes[1]:
            changes["processes"] = processes
            if self.main:
                per_process = config.sample.batch_size * config.sample.num_batches_per_epoch
                warnings.warn(
                    f"resuming the run in {self.output} with {processes[1]} processes where it ran with "
                    f"{processes[0]}: each epoch now samples {per_process * processes[1]} images instead of "
                    f"{per_process * processes[0]}, and the remaining epochs draw other random streams than an "
                    "uninterrupted run would (the change is recorded in resumes.jsonl)",
                    stacklevel=3,
                )
        if self.main:
            record = {"epoch": self.epoch, "changes": changes, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            with (self.output / "resumes.jsonl").open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(record) + "\n")

    def _append(self, record: dict) -> None:
        self.history.append(record)
        if self.main:
            with self.metrics_path.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(record) + "\n")

    def evaluate(self) -> dict[str, float]:
        """Fixed-noise evaluation of the current weights (main process; saves the sample grid).

        At epoch 0 of a new run this also records the base model as the first ``metrics.jsonl``
        record, the "before" of every before/after comparison.
        """
        metrics = self.evaluator.run(self.pipe, self.epoch, self.accelerator) if self.main else {}
        if self.epoch == 0 and not self.history:
            self._append({"epoch": 0, "samples_seen": 0, **metrics})
        return metrics

    def run_epoch(self) -> dict:
        """Train one epoch (evaluating and checkpointing when the config says) and return its record."""
        config, accelerator = self.config, self.accelerator
        generator = torch.Generator().manual_seed(
            epoch_seed(config.seed, self.epoch, accelerator.process_index)
        )
        started = time.perf_counter()
        metrics = self.method.run_epoch(generator)
        seconds = time.perf_counter() - started
        self.epoch = done = self.epoch + 1
        seen = (self.history[-1]["samples_seen"] if self.history else 0) + metrics["samples"]
        record = {"epoch": done, **metrics, "samples_seen": seen, "seconds": seconds}
        record.setdefault("training_seconds", seconds - record.get("sampling_seconds", 0.0))
        if self.main and (done % config.eval.every == 0 or done == config.epochs):
            record.update(self.evaluator.run(self.pipe, done, accelerator))
        self._append(record)
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=done)
        if done % config.save_every == 0 or done == config.epochs:
            self.save_checkpoint()
        return record

    def save_checkpoint(self) -> None:
        """Write the state after the current epoch (main process), atomically."""
        self.accelerator.wait_for_everyone()
        if self.main:
            checkpoint.save(
                self.checkpoints,
                epoch=self.epoch,
                unet=families.denoiser(self.pipe),
                lora=self.config.lora.enabled,
                optimizer=self.context.optimizer,
                trainer_state={"history": self.history, "num_processes": self.accelerator.num_processes},
                method_state=self.method.state_dict(),
                keep=self.config.keep_checkpoints,
            )

    def finish(self) -> TrainResult:
        """Write the trained adapter (or UNet) and the curves; returns where everything is."""
        config, accelerator = self.config, self.accelerator
        accelerator.wait_for_everyone()
        lora_dir = None
        if self.main:
            if config.lora.enabled:
                lora_dir = self.output / "lora"
                pipeline.save_lora(families.denoiser(self.pipe), lora_dir)
            else:
                family = families.of(self.pipe)
                getattr(self.pipe, family.denoiser_name).save_pretrained(self.output / family.denoiser_name)
            eval_keys = sorted({key for record in self.history for key in record if key.startswith("eval/")})
            plots.save_curves(
                self.history,
                ["reward_mean", "implicit_accuracy", *eval_keys],
                self.output / "reward_curve.png",
                title=f"{config.method} on {config.model} — {config.reward}",
            )
        accelerator.end_training()
        return TrainResult(self.output, self.history, lora_dir, self.main)


def train(
    config: TrainConfig, *, reward: rewards.Reward | None = None, resume: bool = False, progress: bool = True
) -> TrainResult:
    """Run ``config.method`` for ``config.epochs`` epochs (continuing the last checkpoint if ``resume``).

    ``reward`` replaces the registry reward named in the config: the way to train on a reward
    written in user code.
    """
    started = time.perf_counter()
    trainer = Trainer(config, reward=reward, resume=resume)
    if trainer.epoch == 0:
        trainer.evaluate()
    bar = tqdm(
        range(trainer.epoch, config.epochs),
        desc=f"{config.method} epochs",
        disable=not (progress and trainer.main),
    )
    for _ in bar:
        record = trainer.run_epoch()
        shown = {"reward": "reward_mean", "accuracy": "implicit_accuracy", "loss": "loss"}
        bar.set_postfix({label: f"{record[key]:.4g}" for label, key in shown.items() if key in record})
    result = trainer.finish()
    result.seconds = time.perf_counter() - started
    return result
