"""What the BLIP-family rewards share: rewards that read an image and a prompt *together*.

ImageReward (BLIP) and BLIP-2 image-text matching score a pair with a text encoder that
cross-attends to the image's patch embeddings, so unlike CLIP there is no text embedding to
cache: every (image, prompt) pair is one text-encoder pass. The image tower, by far the larger
part, still runs once per image: ``pair_scores`` scores an image's patch embeddings against
any number of prompts, a bounded number of pairs at a time.

Both models tokenize with BERT's WordPiece vocabulary. ``tiny_bert_tokenizer`` builds a small
one without a download (letters, digits and punctuation as word pieces, so any text tokenizes),
for the ``tiny-random`` models and the tests.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffalign.rewards.base import RewardError
from diffalign.rewards.checkpoints import TINY_RANDOM, MissingCheckpointError
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import BertTokenizer

PAIRS_PER_PASS = 64  # bounds memory: each pair carries its image's patch embeddings (~577 x 1408 for ViT-g)


class MissingWeightsError(MissingCheckpointError):
    """``MissingCheckpointError`` in one line: what is missing, where it was looked for, how to get it."""

    def __init__(self, *, reward: str, missing: str, looked_in: str, provide: str):
        self.reward, self.missing = reward, missing
        RewardError.__init__(
            self,
            f"reward {reward!r} needs {missing}, not found in {looked_in} (diffalign never downloads "
            f"weights): {provide}, or use checkpoint={TINY_RANDOM!r} for a tiny random model of the same classes",
        )


def local_files(
    spec: str, filenames: Sequence[str], *, reward: str, download: str, option: str
) -> list[Path]:
    """``filenames`` in the folder ``spec``, or in the Hugging Face cache when ``spec`` is a hub id."""
    folder = Path(spec).expanduser()
    found: dict[str, Path] = {}
    if folder.is_dir():
        found = {name: folder / name for name in filenames if (folder / name).is_file()}
        looked_in = str(folder)
    else:
        for name in filenames:
            try:
                found[name] = Path(hf_hub_download(spec, name, local_files_only=True))
            except (LocalEntryNotFoundError, ValueError):  # ValueError: not a valid hub id either
                continue
        looked_in = f"the folder {spec!r} (no such folder) or the Hugging Face cache"
    missing = [name for name in filenames if name not in found]
    if missing:
        raise MissingWeightsError(
            reward=reward,
            missing=" and ".join(missing),
            looked_in=looked_in,
            provide=f"run `{download} --local-dir DIR` where there is internet and pass {option}=DIR",
        )
    return [found[name] for name in filenames]


def tiny_bert_vocab() -> list[str]:
    """A WordPiece vocabulary of 100-odd entries: BERT's special tokens, then letters, digits and
    punctuation both as word starts and as ``##`` continuations, so any lower-case text tokenizes."""
    pieces = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,'!?-")
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces, *(f"##{piece}" for piece in pieces)]


def tiny_bert_tokenizer() -> BertTokenizer:
    """A lower-casing BERT tokenizer over ``tiny_bert_vocab``, built without a download."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vocab.txt"
        path.write_text("\n".join(tiny_bert_vocab()) + "\n", "utf-8")
        return BertTokenizer(str(path), do_lower_case=True)


def pair_scores(
    score: Callable[[torch.Tensor, list[str]], torch.Tensor],
    image_embeds: torch.Tensor,
    image_index: Sequence[int],
    prompts: Sequence[str],
) -> torch.Tensor:
    """``[P]`` scores of P pairs: ``score(embeds  # [p, N, D], prompts)`` on image ``image_index[i]``'s
    embeddings (``image_embeds  # [B, N, D]``) with ``prompts[i]``, ``PAIRS_PER_PASS`` pairs at a time."""
    index = torch.as_tensor(list(image_index), device=image_embeds.device)
    parts = [
        score(
            image_embeds[index[start : start + PAIRS_PER_PASS]], list(prompts[start : start + PAIRS_PER_PASS])
        )
        for start in range(0, len(prompts), PAIRS_PER_PASS)
    ]
    return torch.cat(parts)
