"""HPSv2, the Human Preference Score v2 (Wu et al. 2023).

HPSv2 is open_clip ViT-H/14 (LAION-2B) fine-tuned on HPD v2, 798k human choices between
generated images for the same prompt. The score is the cosine similarity of the normalised
image and prompt embeddings, without CLIP's logit scale (the diagonal of
``image_features @ text_features.T`` in the reference ``hpsv2`` package); it is about 0.2-0.3
for real generations. HPSv2 preprocesses by resizing the longest side and padding with black
to a square (open_clip's ``resize_mode="longest"``), not by center-cropping; square generator
outputs are unaffected, other shapes keep their borders.
"""

from __future__ import annotations

import difflib

from diffalign.rewards.base import RewardError
from diffalign.rewards.checkpoints import TINY_RANDOM, cached_hub_file, existing_file
from diffalign.rewards.open_clip_encoder import OpenClipCosine, load_open_clip, tiny_open_clip

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
BASE_ARCH, BASE_PRETRAINED = "ViT-H-14", "laion2b_s32b_b79k"  # what HPSv2 was fine-tuned from
HPS_PREPROCESS = {"resize_mode": "longest", "fill_color": 0}


class HPSv2(OpenClipCosine):
    """Human preference for each image given its prompt, as HPSv2 predicts it.

    Options: ``version`` (``"v2.0"``, the paper's model and the ``hpsv2`` package default, or
    ``"v2.1"``); ``checkpoint``, the HPS weights file (default: ``HPS_v2_compressed.pt`` or
    ``HPS_v2.1_compressed.pt`` of ``xswu/HPSv2`` in the Hugging Face cache), or
    ``"tiny-random"`` for a tiny random open_clip CLIP; ``device`` (default ``"cpu"``).
    """

    name = "hpsv2"
    differentiable = True

    def __init__(self, checkpoint: str | None = None, version: str = "v2.0", device: str = "cpu"):
        if version not in HPS_FILES:
            close = difflib.get_close_matches(version, list(HPS_FILES), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RewardError(
                f"reward 'hpsv2': unknown version {version!r}.{hint} Choose one of {list(HPS_FILES)}."
            )
        if checkpoint == TINY_RANDOM:
            encoder = tiny_open_clip(preprocess=HPS_PREPROCESS)
        else:
            filename = HPS_FILES[version]
            weights = (
                existing_file(checkpoint, reward=self.name, download=f"hf download {HPS_REPO} {filename}")
                if checkpoint is not None
                else cached_hub_file(HPS_REPO, [filename], reward=self.name)
            )
            # The HPS file holds the whole fine-tuned model, so the base tag only supplies the
            # architecture's activation and preprocessing statistics; its weights are never read.
            encoder = load_open_clip(BASE_ARCH, BASE_PRETRAINED, weights, preprocess=HPS_PREPROCESS)
        super().__init__(encoder, device)
