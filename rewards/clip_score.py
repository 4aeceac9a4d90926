"""CLIP score: how well an image matches its prompt according to CLIP (Radford et al. 2021).

The reward is the cosine similarity of the L2-normalised open_clip image and prompt
embeddings, in [-1, 1] (in practice about 0.1-0.4 for real CLIP models). We keep the raw
cosine rather than CLIPScore's ``2.5 * max(cos, 0)`` (Hessel et al. 2021) or torchmetrics'
``100 * max(cos, 0)``: a positive rescaling changes no ranking or normalised advantage, and
the clamp at 0 would zero the gradient that AlignProp needs.
"""

from __future__ import annotations

from diffalign.rewards.checkpoints import TINY_RANDOM
from diffalign.rewards.open_clip_encoder import (
    OpenClipCosine,
    load_open_clip,
    pretrained_weights,
    tiny_open_clip,
)


class ClipScore(OpenClipCosine):
    """Cosine similarity between each image and its prompt under an open_clip model.

    Options: ``arch`` (an open_clip architecture, default ``"ViT-L-14"``) and ``pretrained``
    (its weights tag, default ``"openai"``; it also fixes activation and preprocessing);
    ``checkpoint``, the weights file (default: the tag's file in the Hugging Face cache), or
    ``"tiny-random"`` for a tiny random open_clip CLIP (``arch``/``pretrained`` then unused);
    ``device`` (default ``"cpu"``).
    """

    name = "clip-score"
    differentiable = True

    def __init__(
        self,
        checkpoint: str | None = None,
        arch: str = "ViT-L-14",
        pretrained: str = "openai",
        device: str = "cpu",
    ):
        if checkpoint == TINY_RANDOM:
            encoder = tiny_open_clip()
        else:
            weights = pretrained_weights(arch, pretrained, checkpoint, reward=self.name)
            encoder = load_open_clip(arch, pretrained, weights)
        super().__init__(encoder, device)
