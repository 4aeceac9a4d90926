"""Text quality of prompts, FiFA's second term: how well formed a prompt is, higher = better.

FiFA (Yang et al., ICLR 2025, arXiv 2410.10166) asks a large language model to rate each prompt
so that low-quality and harmful prompts are not selected. A scorer here is any callable
``prompts -> [N]`` floats; ``from_spec`` builds one by its registered name
(``diffalign.registry.register_text_quality``). This module registers one for any text:

- ``lm:PATH`` — ``LanguageModelQuality``: the mean token log-likelihood of the prompt under a local
  causal language model (``transformers``, local files only), i.e. minus its log-perplexity.

A world registers its own: ShapesWorld's ``shapes-grammar`` (``diffalign.shapes.text_quality``)
knows exactly which prompts its grammar can read.

Why a likelihood rather than the paper's rating: a rating needs an instruction-following LLM and a
rubric prompt whose exact wording we do not have offline, and its answer must be parsed; the
likelihood needs any causal LM (a 0.5B model on a CPU), is deterministic, and ranks garbled,
truncated and keyboard-mash prompts low, which is what the filter needs. It does not see harm:
a fluent harmful prompt scores well; a rating scorer registered under another name can add that.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffalign import registry
from diffalign.errors import DiffalignError
from diffalign.registry import register_text_quality as register

TextQualityScorer = Callable[[list[str]], Any]  # prompts -> [N] floats (array, list or tensor)


class TextQualityError(DiffalignError, ValueError):
    """A text-quality scorer cannot work: an unknown name, a missing model, unusable scores."""


def spec_names() -> list[str]:
    """How each registered scorer is named: ``lm:PATH``, ``shapes-grammar``, ..."""
    return [entry.spec for entry in registry.TEXT_QUALITY]


def from_spec(spec: str | TextQualityScorer, **options: Any) -> TextQualityScorer:
    """The scorer named by ``spec`` (a registered name, or ``name:PATH`` for one that reads a path,
    such as ``lm:PATH``) built with ``options``; a callable is returned as it is."""
    if callable(spec):
        return spec
    kind, _, argument = str(spec).partition(":")
    entry = registry.TEXT_QUALITY.get(kind)
    if entry is None or entry.takes_path != bool(argument):
        names = spec_names()
        hint = registry.suggestion(kind, [entry.name for entry in registry.TEXT_QUALITY])
        raise TextQualityError(f"unknown text-quality scorer {spec!r}.{hint} Available: {', '.join(names)}.")
    return entry.make(argument, **options) if entry.takes_path else entry.make(**options)


def scores_of(scorer: TextQualityScorer, prompts: Sequence[str]) -> np.ndarray:
    """``scorer(prompts)`` as a finite float64 array ``[N]``; anything else is an error naming the scorer."""
    values = scorer(list(prompts))
    values = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64)
    if values.shape != (len(prompts),) or not np.isfinite(values).all():
        raise TextQualityError(
            f"text-quality scorer {getattr(scorer, 'name', scorer)!r} returned {values.shape} values "
            f"(finite: {bool(np.isfinite(values).all())}) for {len(prompts)} prompts; expected one finite "
            "score per prompt"
        )
    return values


class LanguageModelQuality:
    """Mean log-likelihood per token of a prompt under a local causal LM (higher = better formed).

    Each prompt is scored as ``<bos> prompt <eos>``: the beginning token makes the first word count,
    the end token makes a prompt cut off mid-phrase ("a cat sitting on the") unlikely to end there.
    The mean (not the sum) keeps long prompts from scoring low for their length. Computed in fp32,
    in batches of ``batch_size`` distinct prompts, each prompt once.
    """

    def __init__(self, model_path: str | os.PathLike[str], *, batch_size: int = 16, device: str = "cpu"):
        self.model_path = Path(model_path).expanduser()
        self.name = f"lm:{self.model_path}"
        if not (self.model_path / "config.json").is_file():
            raise TextQualityError(
                f"language model folder {str(self.model_path)!r} does not exist or has no config.json. "
                "Save a causal language model there on a machine with internet (e.g. `hf download "
                f"Qwen/Qwen2.5-0.5B --local-dir {self.model_path}`), or pass --text-quality lm:PATH with the "
                "folder of one you have (model and tokenizer files, as save_pretrained writes them)."
            )
        if batch_size < 1:
            raise TextQualityError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = device
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        self._model = AutoModelForCausalLM.from_pretrained(
            self.model_path, local_files_only=True, torch_dtype="float32"
        )
        self._model.eval().to(self.device)

    def token_ids(self, prompt: str) -> list[int]:
        """``<bos> prompt <eos>`` as ids (GPT-2-style tokenizers use their one special token for both)."""
        if self._tokenizer is None:
            self._load()
        tokenizer = self._tokenizer
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
        if bos is None:
            raise TextQualityError(
                f"the tokenizer of {str(self.model_path)!r} has neither a beginning nor an end token, so the "
                "first word of a prompt and its ending cannot be scored; use a causal LM that has one"
            )
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        limit = getattr(self._model.config, "max_position_embeddings", None) or getattr(
            self._model.config, "n_positions", None
        )
        if limit is not None and len(ids) + 2 > limit:
            ids = ids[: limit - 2]  # the rare over-long caption is scored on its beginning
        return [bos, *ids, eos]

    def __call__(self, prompts: list[str]) -> np.ndarray:
        import torch

        distinct = list(dict.fromkeys(prompts))
        sequences = [self.token_ids(prompt) for prompt in distinct]
        tokenizer = self._tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        scores: dict[str, float] = {}
        for start in range(0, len(distinct), self.batch_size):
            batch = sequences[start : start + self.batch_size]
            width = max(len(ids) for ids in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, sequence in enumerate(batch):
                ids[row, : len(sequence)] = torch.tensor(sequence)
                mask[row, : len(sequence)] = 1
            with torch.no_grad():
                logits = self._model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                ).logits
            log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # fp32: sums of log-probs
            token = log_probs.gather(-1, ids[:, 1:, None].to(self.device))[..., 0]  # [B, L-1]
            scored = mask[:, 1:].to(token.device).float()
            means = (token * scored).sum(dim=1) / scored.sum(dim=1)
            scores.update(zip(distinct[start : start + self.batch_size], means.tolist()))
        return np.array([scores[prompt] for prompt in prompts], dtype=np.float64)


register(
    "lm",
    LanguageModelQuality,
    takes_path=True,
    description="mean token log-likelihood under a local causal language model (minus log-perplexity)",
)
