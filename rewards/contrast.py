"""Contrastive prompts for TextNorm: captions that differ from a prompt in one detail.

TextNorm (Kim et al., ICLR 2024, "Confidence-aware Reward Optimization for Fine-tuning
Text-to-Image Models") calibrates a reward by comparing an image's score for its prompt with
its scores for *semantically contrastive* prompts: minimal edits that change the meaning (a
different count, colour, object, attribute binding or spatial relation). A generator is any
callable ``prompt -> list[str]``; ``from_spec`` builds one by its registered name
(``diffalign.registry.register_contrast``). This module registers three for any text:

- ``rules`` — ``RuleContrast``: word swaps (numbers, colours, spatial words) for free text.
- ``file:PATH`` — ``FileContrast``: a JSON file of prompt -> contrasts (e.g. the authors' release).
- ``lm:PATH`` — ``LanguageModelContrast``: a local causal language model, few-shot, cached on disk.

A world registers its own: ShapesWorld's ``shapes`` (``diffalign.shapes.contrast``) is exact for
its grammar.

A generator returns ``[]`` when it has nothing to offer; TextNorm then stops with an error
that says how to fix it (see ``textnorm.py`` for why there is no silent fallback).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from diffalign.rewards.base import RewardError

from diffalign import outputs, registry
from diffalign.registry import register_contrast as register

ContrastGenerator = Callable[[str], list[str]]


class ContrastError(RewardError):
    """A contrast generator cannot work: an unreadable file, a missing model, a prompt it cannot read."""


def spec_names() -> list[str]:
    """How each registered generator is named in a ``contrast`` option: ``rules``, ``file:PATH``, ..."""
    return [entry.spec for entry in registry.CONTRASTS]


def from_spec(spec: str | ContrastGenerator, **options: Any) -> ContrastGenerator:
    """The generator named by ``spec`` (a registered name, or ``name:PATH`` for one that reads a
    path: ``file:PATH``, ``lm:PATH``) built with ``options``; a callable is returned as it is."""
    if callable(spec):
        if options:
            raise ContrastError(
                f"contrast options {sorted(options)} only apply to generators named by a string"
            )
        return spec
    kind, _, argument = str(spec).partition(":")
    entry = registry.CONTRASTS.get(kind)
    if entry is None or entry.takes_path != bool(argument):
        names = spec_names()
        raise ContrastError(
            f"unknown contrast generator {spec!r}.{registry.suggestion(str(spec), names)} "
            f"Choose one of: {', '.join(names)}."
        )
    try:
        return entry.make(argument, **options) if entry.takes_path else entry.make(**options)
    except TypeError as error:
        raise ContrastError(
            f"contrast generator {spec!r} does not take options {sorted(options)}: {error}"
        ) from error


def _normal(prompt: str) -> str:
    """The form two prompts are compared in: lower case, single spaces, no final full stop."""
    return " ".join(prompt.lower().strip().rstrip(".").split())


def _distinct(prompt: str, candidates: Iterator[str] | Sequence[str]) -> list[str]:
    """``candidates`` in order, without repeats and without ``prompt`` itself (compared normalised)."""
    seen = {_normal(prompt)}
    kept = []
    for candidate in candidates:
        key = _normal(candidate)
        if key and key not in seen:
            seen.add(key)
            kept.append(candidate.strip())
    return kept


# --- free text: word swaps -----------------------------------------------------------------------

_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# Synonyms share a group, so "grey" never becomes a contrast of "gray".
_COLOUR_GROUPS = (
    ("red",),
    ("orange",),
    ("yellow",),
    ("green",),
    ("cyan",),
    ("blue",),
    ("purple",),
    ("pink",),
    ("brown",),
    ("black",),
    ("white",),
    ("gray", "grey"),
)
_OPPOSITES = {
    "left": "right",
    "right": "left",
    "above": "below",
    "below": "above",
    "over": "under",
    "under": "over",
    "top": "bottom",
    "bottom": "top",
    "in front of": "behind",
    "behind": "in front of",
    "inside": "outside",
    "outside": "inside",
}
_COLOUR_GROUP = {word: group for group in _COLOUR_GROUPS for word in group}
_TERMS = sorted([*_NUMBERS, *_COLOUR_GROUP, *_OPPOSITES], key=len, reverse=True)  # longest phrase first
_TERM_RE = re.compile(r"\b(" + "|".join(re.escape(term) for term in _TERMS) + r")\b", re.IGNORECASE)


class RuleContrast:
    """Contrasts for free text by swapping one known word: a number for its neighbours (two ->
    one, three), a colour for every other colour, a spatial word for its opposite (left/right,
    above/below, in front of/behind, ...), and two different colours for each other (attribute
    binding). Returns ``[]`` when the prompt has none of these words.

    It knows nothing of grammar ("one cats" can happen) — enough for a contrast, which only has
    to describe a different image; use ``file:`` or ``lm:`` generators for fluent contrasts.
    """

    name = "rules"

    def __call__(self, prompt: str) -> list[str]:
        matches = list(_TERM_RE.finditer(prompt))
        candidates = []
        for match in matches:
            for word in _substitutes(match[0].lower()):
                candidates.append(_replace(prompt, [(match, word)]))
        colours = [m for m in matches if m[0].lower() in _COLOUR_GROUP]
        for first, second in combinations(colours, 2):
            if _COLOUR_GROUP[first[0].lower()] != _COLOUR_GROUP[second[0].lower()]:
                candidates.append(_replace(prompt, [(first, second[0].lower()), (second, first[0].lower())]))
        return _distinct(prompt, candidates)


def _substitutes(word: str) -> list[str]:
    if word in _NUMBERS:
        n = _NUMBERS.index(word)
        return [_NUMBERS[i] for i in (n - 1, n + 1) if 0 <= i < len(_NUMBERS)]
    if word in _COLOUR_GROUP:
        return [group[0] for group in _COLOUR_GROUPS if group != _COLOUR_GROUP[word]]
    return [_OPPOSITES[word]]


def _replace(prompt: str, edits: list[tuple[re.Match[str], str]]) -> str:
    """``prompt`` with each matched span replaced by its word (capitalised like the original)."""
    for match, word in sorted(edits, key=lambda edit: edit[0].start(), reverse=True):
        if match[0][0].isupper():
            word = word[0].upper() + word[1:]
        prompt = prompt[: match.start()] + word + prompt[match.end() :]
    return prompt


# --- a file of contrasts -------------------------------------------------------------------------


class FileContrast:
    """Contrasts read from a JSON file that maps each prompt to its list of contrastive prompts:

        {"a red car left of a blue bus": ["a blue car left of a red bus", "a red car right of a blue bus"]}

    This is the shape of the contrast sets the TextNorm authors released (prompt -> LLM-written
    contrasts); a file in another layout is an error naming the file. Prompts are looked up in a
    normalised form (case, spacing, final full stop ignored). A prompt missing from the file gets
    ``[]``, and TextNorm's error then asks for it to be added.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).expanduser()
        self.name = f"file:{self.path}"
        if not self.path.is_file():
            raise ContrastError(
                f"contrast file {str(self.path)!r} does not exist; give a JSON file mapping each prompt to a "
                'list of contrastive prompts, e.g. {"a red circle": ["a blue circle", "two red circles"]}'
            )
        try:
            data = json.loads(self.path.read_text("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ContrastError(f"contrast file {str(self.path)!r} is not valid JSON: {error}") from error
        self.contrasts: dict[str, list[str]] = {}
        for prompt, contrasts in self._entries(data):
            key = _normal(prompt)
            if key in self.contrasts:
                raise ContrastError(
                    f"contrast file {str(self.path)!r} lists {prompt!r} twice (prompts are compared ignoring "
                    "case, spacing and a final full stop); merge the two entries"
                )
            self.contrasts[key] = _distinct(prompt, contrasts)

    def _entries(self, data: Any) -> Iterator[tuple[str, list[str]]]:
        where = f"contrast file {str(self.path)!r}"
        if not isinstance(data, dict):
            raise ContrastError(
                f"{where} must hold a JSON object mapping each prompt to a list of contrastive prompts, "
                f"got a JSON {type(data).__name__}"
            )
        for prompt, contrasts in data.items():
            if not isinstance(contrasts, list) or not all(isinstance(c, str) for c in contrasts):
                raise ContrastError(
                    f"{where}: the value of {prompt!r} must be a list of strings (its contrastive prompts), "
                    f"got {json.dumps(contrasts)[:80]}"
                )
            yield prompt, contrasts

    def __call__(self, prompt: str) -> list[str]:
        return list(self.contrasts.get(_normal(prompt), []))


# --- a local language model ----------------------------------------------------------------------

FEW_SHOT = """Rewrite the caption so that it describes a different picture. Change one detail: a number, \
a colour, an object, which object has which attribute, or where things are. Write one rewrite per line.

Caption: a black dog sleeping on a red sofa
Rewrites:
a black dog sleeping on a blue sofa
a red dog sleeping on a black sofa
two black dogs sleeping on a red sofa
a black cat sleeping on a red sofa
a black dog sleeping under a red sofa

Caption: three apples to the left of a glass
Rewrites:
two apples to the left of a glass
three apples to the right of a glass
three oranges to the left of a glass
a glass to the left of three apples

Caption: {prompt}
Rewrites:
"""
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")


class LanguageModelContrast:
    """Contrasts written by a local causal language model (``transformers``, local files only).

    The model continues a few-shot prompt (``FEW_SHOT``) with greedy decoding; each output line
    is a contrast, until a blank line or the next "Caption:". Lines are deduplicated and the
    prompt itself is dropped; at most ``max_contrasts`` are kept. Results are cached in a JSON
    file (``cache_file``, default ``$XDG_CACHE_HOME/diffalign/lm-contrasts.json``) under a key
    made of the model folder and the generation settings, written atomically, so a run's
    prompts are generated once across runs and processes, and the model is loaded only when a
    prompt is not cached yet. The key does not see weights change inside the same folder:
    delete the cache file after replacing a model in place.

    A base or an instruction-tuned model both work with the plain few-shot text; small models
    (0.5-2B parameters) write usable contrasts for short captions.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        cache_file: str | os.PathLike[str] | None = None,
        max_contrasts: int = 8,
        max_new_tokens: int = 96,
        device: str = "cpu",
    ):
        self.model_path = Path(model_path).expanduser()
        self.name = f"lm:{self.model_path}"
        if not (self.model_path / "config.json").is_file():
            raise ContrastError(
                f"language model folder {str(self.model_path)!r} does not exist or has no config.json. "
                "Save a causal language model there on a machine with internet (e.g. `hf download "
                f"Qwen/Qwen2.5-0.5B-Instruct --local-dir {self.model_path}`), or pass contrast lm:PATH "
                "with the folder of one you have (model and tokenizer files, as save_pretrained writes them)."
            )
        if max_contrasts < 1 or max_new_tokens < 1:
            raise ContrastError("max_contrasts and max_new_tokens must be at least 1")
        self.max_contrasts = max_contrasts
        self.max_new_tokens = max_new_tokens
        self.device = device
        cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        self.cache_file = Path(cache_file) if cache_file else cache_root / "diffalign" / "lm-contrasts.json"
        settings = json.dumps([FEW_SHOT, max_new_tokens, "greedy"])
        self.key = f"{self.model_path.resolve()}#{hashlib.sha256(settings.encode()).hexdigest()[:12]}"
        self._cache: dict[str, list[str]] = self._read_cache().get(self.key, {})
        self._model: Any = None
        self._tokenizer: Any = None

    def __call__(self, prompt: str) -> list[str]:
        if prompt not in self._cache:
            self._cache[prompt] = parse_lines(self.generate(prompt), prompt)
            self._write_cache(prompt)
        return self._cache[prompt][: self.max_contrasts]

    def generate(self, prompt: str) -> str:
        """The model's raw continuation of the few-shot prompt for ``prompt``."""
        import torch

        if self._model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
            self._model = AutoModelForCausalLM.from_pretrained(self.model_path, local_files_only=True)
            self._model.eval().to(self.device)
        inputs = self._tokenizer(FEW_SHOT.format(prompt=prompt), return_tensors="pt").to(self.device)
        pad = self._tokenizer.pad_token_id
        pad = self._tokenizer.eos_token_id if pad is None else pad  # GPT-2-style tokenizers have no pad token
        with torch.no_grad():
            output = self._model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad
            )
        return self._tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)

    def _read_cache(self) -> dict[str, dict[str, list[str]]]:
        if not self.cache_file.is_file():
            return {}
        try:
            data = json.loads(self.cache_file.read_text("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ContrastError(
                f"contrast cache {str(self.cache_file)!r} is not valid JSON ({error}); delete it and the "
                "contrasts will be generated again"
            ) from error
        if not isinstance(data, dict):
            raise ContrastError(f"contrast cache {str(self.cache_file)!r} is not a JSON object; delete it")
        return data

    def _write_cache(self, prompt: str) -> None:
        """Add ``prompt``'s contrasts to the file, keeping what other processes wrote meanwhile;
        written to a temporary file and renamed, so a reader never sees half a file."""
        data = self._read_cache()
        data.setdefault(self.key, {})[prompt] = self._cache[prompt]
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        outputs.write_text(self.cache_file, json.dumps(data, indent=1, ensure_ascii=False))


def parse_lines(generated: str, prompt: str) -> list[str]:
    """The contrasts in a model's continuation: one per line, bullets and numbering removed,
    up to a blank line or the next "Caption:", without repeats or the prompt itself."""
    lines = []
    for raw in generated.splitlines():
        line = _BULLET.sub("", raw).strip().strip("\"'").strip()
        if line.lower().startswith(("caption:", "rewrites:")) or (not line and lines):
            break
        if line:
            lines.append(line)
    return _distinct(prompt, lines)


register("rules", RuleContrast, description="word swaps (numbers, colours, spatial words) for free text")
register("file", FileContrast, takes_path=True, description="a JSON file of prompt -> contrastive prompts")
register("lm", LanguageModelContrast, takes_path=True, description="a local causal language model, few-shot")
