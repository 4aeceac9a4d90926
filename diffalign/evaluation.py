"""Held-fixed evaluation during training: the same prompts and the same noise at every eval epoch.

Training rewards are noisy (new prompts, new noise each epoch). The evaluator draws its
prompts once per prompt set and its initial latents once, samples them deterministically
(DDIM η = 0), and scores them with the training reward and any extra rewards — on ShapesWorld
the exact oracle — so an eval curve moves only because the model changed. It also saves the
sample grid of the first set, the before/after picture of a run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline

from diffalign import families, plots
from diffalign import prompts as prompt_sets
from diffalign.rewards import Reward, checked_call
from diffalign.sampling import sample

_EVAL_SEED_OFFSET = 12_345  # keeps evaluation noise apart from the training streams


def evaluation_generator(seed: int) -> torch.Generator:
    """The generator the evaluator of a run with ``seed`` draws its prompts (one set after another,
    in order) and then its initial latents from."""
    return torch.Generator().manual_seed(seed + _EVAL_SEED_OFFSET)


class Evaluator:
    """Scores fixed samples of several prompt sets with several rewards.

    Metric keys are ``eval/<prompt set>/<reward name>`` (a prompt file by its stem); the grid
    shows the first set.
    """

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        *,
        prompt_set_names: list[str],
        size: int,
        rewards: list[Reward],
        num_steps: int,
        guidance_scale: float,
        negative_prompt: str,
        seed: int,
        grid_folder: Path,
        grid_size: int,
        batch_size: int = 32,
    ):
        generator = evaluation_generator(seed)
        self.prompts: dict[str, list[str]] = {}
        for spec in prompt_set_names:
            name = prompt_sets.display_name(spec)
            if name in self.prompts:  # two files with one stem
                name = f"{name}-{len(self.prompts)}"
            self.prompts[name] = prompt_sets.draw(prompt_sets.load_prompts(spec), size, generator)
        self.latents = families.of(pipe).initial_latents(pipe, size, generator).cpu()
        self.rewards = rewards
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.grid_folder = grid_folder
        self.grid_size = grid_size
        self.batch_size = batch_size

    def _images(
        self, pipe: StableDiffusionPipeline, prompts: list[str], accelerator: Accelerator
    ) -> torch.Tensor:
        chunks = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            with accelerator.autocast():
                trajectory = sample(
                    pipe,
                    batch,
                    num_steps=self.num_steps,
                    guidance_scale=self.guidance_scale,
                    eta=0.0,
                    latents=self.latents[start : start + len(batch)].to(families.denoiser(pipe).device),
                    negative_prompt=self.negative_prompt,
                )
            chunks.append(trajectory.images)
        return torch.cat(chunks)

    def scores(
        self, pipe: StableDiffusionPipeline, accelerator: Accelerator, *, grid_epoch: int | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Per-image scores ``{prompt set: {reward: [size]}}`` of the current weights; the grid of the
        first set is written only when ``grid_epoch`` is given."""
        denoiser = families.denoiser(pipe)
        was_training = denoiser.training
        denoiser.eval()
        scores: dict[str, dict[str, torch.Tensor]] = {}
        for index, (name, prompts) in enumerate(self.prompts.items()):
            images = self._images(pipe, prompts, accelerator)
            scores[name] = {
                reward.name: checked_call(reward, images, prompts).cpu() for reward in self.rewards
            }
            if index == 0 and grid_epoch is not None:
                shown = min(self.grid_size, len(prompts))
                first = self.rewards[0].name
                plots.save_grid(
                    images[:shown],
                    prompts[:shown],
                    self.grid_folder / f"epoch-{grid_epoch:04d}.png",
                    scores=scores[name][first][:shown].tolist(),
                    title=f"epoch {grid_epoch} — {name}, {first} (mean of {len(prompts)}: "
                    f"{scores[name][first].mean().item():.3g})",
                )
        denoiser.train(was_training)
        return scores

    def run(self, pipe: StableDiffusionPipeline, epoch: int, accelerator: Accelerator) -> dict[str, float]:
        """Sample every set under the current weights, score, save the grid; returns the mean metrics."""
        scores = self.scores(pipe, accelerator, grid_epoch=epoch)
        return {
            f"eval/{name}/{reward}": values.mean().item()
            for name, by_reward in scores.items()
            for reward, values in by_reward.items()
        }
