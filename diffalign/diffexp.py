"""DiffExp: exploration for online reward fine-tuning (Chae, Choi, Kim, Lee; AAAI 2025, arXiv 2502.14070).

Online methods learn only from the samples they draw, so samples that all look alike give
little reward signal. DiffExp makes the sampler explore with two changes:

(a) a dynamic classifier-free-guidance schedule: the first, noisiest denoising steps — the ones
    that fix the layout — run with a low guidance scale, which diversifies compositions; the
    remaining steps run with the configured (high) scale, which keeps images faithful;
(b) random prompt weighting: one or more phrases of each prompt get a random emphasis weight,
    so the sampler visits renderings that stress different parts of the prompt.

The paper describes both strategies; its exact constants were not available to us offline, so
every number here is a documented config value (``diffexp.*``) with defaults we chose for the
20-step samplers used in diffalign: a per-sample low scale drawn from ``low_guidance`` for the
first ``low_guidance_fraction`` of the steps, and one content word per prompt weighted by a
factor drawn from ``phrase_weight``. Weighted embeddings come from ``compel``.

Exploration changes only how samples are drawn. The trajectory stores the exact per-step scales
and embeddings that produced each sample, so log-probabilities and training forward passes use
them too (the importance ratio is exactly 1 before the first update), and the reward scores the
original, unweighted prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from compel import Compel
from diffusers import StableDiffusionPipeline

from diffalign import families
from diffalign.config import DiffExpSection
from diffalign.errors import DiffalignError

# Words that carry no content of their own and are never weighted.
_FUNCTION_WORDS = (
    "a an the of and or with without on in at to from by for into onto over under above below "
    "left right next near beside behind front is are be its their his her this that these those"
)
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())
_COMPEL_SYNTAX = re.compile(r"[()\[\]+]|\.blend\(|\.and\(|\bAND\b")


class ExplorationError(DiffalignError, ValueError):
    """A prompt or setting DiffExp cannot use; raised before training starts."""


@dataclass
class Exploration:
    """How one batch is sampled: ``guidance_scales  # [B, T]``, ``prompt_embeds  # [B, L, D]``."""

    guidance_scales: torch.Tensor
    prompt_embeds: torch.Tensor
    weighted_prompts: list[str]


def content_words(prompt: str) -> list[tuple[int, int]]:
    """Character spans of the prompt's weightable phrases: its words that are not function words."""
    return [
        (match.start(), match.end())
        for match in re.finditer(r"[A-Za-z][A-Za-z'-]*", prompt)
        if match.group(0).lower() not in FUNCTION_WORDS
    ]


def guidance_schedule(
    section: DiffExpSection, guidance_scale: float, batch: int, num_steps: int, generator: torch.Generator
) -> torch.Tensor:
    """Per-sample per-step scales ``[batch, num_steps]``: a drawn low scale early, ``guidance_scale`` after.

    Step 0 is the noisiest step (DDIM runs timesteps from high to low).
    """
    scales = torch.full((batch, num_steps), float(guidance_scale))
    if not section.cfg_schedule:
        return scales
    low_min, low_max = section.low_guidance
    low = low_min + (low_max - low_min) * torch.rand(batch, generator=generator)
    early = round(section.low_guidance_fraction * num_steps)
    scales[:, :early] = low[:, None]
    return scales


class DiffExp:
    """Draws DiffExp's guidance schedules and phrase weights for a pipeline's prompts."""

    def __init__(
        self, pipe: StableDiffusionPipeline, section: DiffExpSection, guidance_scale: float, num_steps: int
    ):
        section.check()
        self.pipe = pipe
        self.section = section
        self.guidance_scale = guidance_scale
        self.num_steps = num_steps
        if not families.of(pipe).supports_prompt_weighting:
            raise ExplorationError(
                f"DiffExp weights prompt phrases with compel, which reads Stable Diffusion 1.x/2.x text encoders; "
                f"a {type(pipe).__name__} encodes with CLIP and T5 jointly. Use exploration=none on this model."
            )
        self.compel = Compel(
            tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, truncate_long_prompts=True
        )

    def check_prompts(self, prompts: list[str]) -> None:
        """Refuse prompts whose weighting compel would misread, naming the first bad one."""
        for prompt in prompts:
            if _COMPEL_SYNTAX.search(prompt):
                raise ExplorationError(
                    f"prompt {prompt!r} contains compel syntax (parentheses, brackets, '+', .blend/.and or AND), "
                    "so DiffExp's phrase weighting cannot be parsed unambiguously; remove those characters or "
                    "set exploration: none"
                )
            if self.section.prompt_weighting and not content_words(prompt):
                raise ExplorationError(
                    f"prompt {prompt!r} has no content word to weight; set diffexp.prompt_weighting=false "
                    "or exploration: none"
                )

    def weight_phrases(self, prompt: str, generator: torch.Generator) -> str:
        """``prompt`` with ``weighted_phrases`` random content words in compel syntax, ``(word)1.23``."""
        spans = content_words(prompt)
        count = min(self.section.weighted_phrases, len(spans))
        chosen = sorted(torch.randperm(len(spans), generator=generator)[:count].tolist())
        low, high = self.section.phrase_weight
        pieces, cursor = [], 0
        for index in chosen:
            start, end = spans[index]
            weight = low + (high - low) * torch.rand((), generator=generator).item()
            pieces.append(f"{prompt[cursor:start]}({prompt[start:end]}){weight:.3f}")
            cursor = end
        return "".join(pieces) + prompt[cursor:]

    @torch.no_grad()
    def explore(self, prompts: list[str], generator: torch.Generator) -> Exploration:
        """The schedule and embeddings one batch of ``prompts`` is sampled with."""
        scales = guidance_schedule(self.section, self.guidance_scale, len(prompts), self.num_steps, generator)
        if self.section.prompt_weighting:
            weighted = [self.weight_phrases(prompt, generator) for prompt in prompts]
        else:
            weighted = list(prompts)
        embeds = self.compel(weighted)
        return Exploration(scales, embeds, weighted)
