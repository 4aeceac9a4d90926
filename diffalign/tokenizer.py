"""The real CLIP tokenizer, built offline from the BPE file that open_clip ships.

Stable Diffusion's text encoder and every CLIP-based reward need OpenAI's CLIP BPE
vocabulary. Downloading ``tokenizer/vocab.json`` from a hub is impossible offline, but
open_clip bundles the original merges (``bpe_simple_vocab_16e6.txt.gz``); its own
``SimpleTokenizer`` already turns them into the vocabulary, so we reuse that and hand the
tables to ``transformers.CLIPTokenizer``. Token ids equal open_clip's (and OpenAI's).
"""

from __future__ import annotations

import functools

from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPTokenizer

# open_clip spells the special tokens differently from OpenAI/transformers; the ids are the same.
_SPECIAL_TOKEN_NAMES = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
MODEL_MAX_LENGTH = 77


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    simple = SimpleTokenizer()
    vocab = {_SPECIAL_TOKEN_NAMES.get(token, token): index for token, index in simple.encoder.items()}
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    return vocab, merges


def clip_tokenizer(model_max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """A ``transformers.CLIPTokenizer`` identical to OpenAI's, built without any download."""
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
