"""Detect-and-Compare (D&C; Jang et al., MuDI, NeurIPS 2024, arXiv 2404.04243): does a generated
image show every subject, each once, without mixing their identities?

Why a new metric: DINO or CLIP similarity of a whole image to each subject's references cannot tell
two distinct subjects from one subject drawn twice or from a blend of both, the failures that
multi-subject personalisation suffers from. D&C looks at each object separately and asks whether
the objects relate to the subjects the way the subjects' own references relate to each other.

For an image and N subjects:

1. *Detect* the objects of the subjects' classes (an open-vocabulary detector queried with the
   class words): D detections.
2. *Compare*: embed each detection and each subject's reference images, and build
   ``S_det[i, j]`` (``[D, N]``), the mean similarity of detection i to subject j's references, and
   ``S_ref[j, k]`` (``[N, N]``), the mean similarity of subject j's references to subject k's.
3. If D ≠ N a subject is missing or one is drawn twice: D&C = 0. Otherwise each subject is matched
   to one detection (``match_detections``: the Hungarian assignment maximising the total similarity,
   so the order in which the detector lists objects does not matter) and

       D&C = max(0, 1 − ‖S_det[matched] − S_ref‖_F)

   A faithful image has S_det ≈ S_ref: each object is as close to its subject as a fresh photo of it
   would be, and as far from the other subjects as the subjects are from each other. A blend raises
   the off-diagonal entries and lowers the diagonal; a subject drawn twice leaves one row wrong.

The normalisation, and where it comes from: the paper defines D&C through the difference of the two
matrices; the authors' released notebook (``detect_and_compare/demo.ipynb`` in agwmon/MuDI) takes
the plain Frobenius norm of that difference, with no division by N, and returns the largest distance
(1, so D&C 0) when the count is wrong. ``dnc_score`` does the same, so that values compare with the
paper's tables (almost all of which have N = 2). As entries are cosines the raw norm can exceed 1
for badly wrong images, so the score is clipped at 0, keeping it in [0, 1]. ``per_entry=True``
divides the norm by N instead (the root-mean-square entry difference), which keeps scores
comparable across different numbers of subjects; it is not the paper's number.

Two further choices differ from the release, each for a stated reason:

- ``S_ref``'s diagonal averages over *distinct* pairs of a subject's references (the release also
  counts each reference against itself, which adds exactly 1s and so biases the diagonal upwards by
  (1 − mean)/R for R references). A generated object is never one of the references, so a held-out
  reference is the fair yardstick. With a single reference the diagonal is 1.
- Detections are matched to subjects with the Hungarian algorithm (the release takes, subject by
  subject, the best remaining detection, which can depend on the order of subjects).

The real scorer, ``OwlDinoDnC`` (registered as ``owlv2-dinov2``), detects with OWLv2 (Minderer et
al. 2023; MuDI's detector) and compares with DINOv2's CLS token and cosine similarity (the paper
reports D&C with DreamSim and with DINOv2 features; DINOv2 loads through transformers alone). It
cannot tell whether one object carries traits of two subjects, so its ``mixed`` is None; a world
with an exact detector (ShapesWorld's ``shapes-exact``) can. ``evaluate_folder`` scores a folder of
generated images and writes ``dnc.json`` and ``dnc.csv``; ``diffalign bench dnc`` is its command.
"""

from __future__ import annotations

import csv
import io
import json
import math
import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffalign import registry
from diffalign.errors import DiffalignError
from diffalign.rewards.checkpoints import TINY_RANDOM, MissingCheckpointError, RewardError, seeded
from diffalign.subjects import SubjectImages

OWL_ID = "google/owlv2-base-patch16-ensemble"  # the detector MuDI uses, in its ensemble variant
DINO_ID = "facebook/dinov2-base"
TINY_IMAGE_SIZE = 32


class DnCError(DiffalignError, ValueError):
    """D&C cannot be computed as asked: matrices of the wrong shape, no subjects, an unknown scorer."""


@dataclass(frozen=True)
class DnCResult:
    """One image's verdict."""

    dnc: float  # the D&C score in [0, 1]
    detections: int  # objects of the subjects' classes found
    all_present: bool  # every subject found, each once
    mixed: bool | None  # a detection carries traits of two subjects (None: the scorer cannot tell)


class DnCScorer(Protocol):
    """Scores generated images against the subjects (real: a detector + an image embedder;
    ShapesWorld: the exact identity detector)."""

    name: str

    def __call__(self, images: torch.Tensor, subjects: list[SubjectImages]) -> list[DnCResult]:
        """``images  # [B, 3, H, W]`` in [0, 1] → one result per image."""
        ...


# --- the score -------------------------------------------------------------------------------------


def _check_matrices(det_vs_subject: torch.Tensor, ref_vs_ref: torch.Tensor) -> None:
    if ref_vs_ref.dim() != 2 or ref_vs_ref.shape[0] != ref_vs_ref.shape[1] or ref_vs_ref.shape[0] == 0:
        raise DnCError(
            f"ref_vs_ref must be a square [N, N] matrix with N ≥ 1 subjects, got shape {tuple(ref_vs_ref.shape)}"
        )
    if det_vs_subject.dim() != 2 or det_vs_subject.shape[1] != ref_vs_ref.shape[0]:
        raise DnCError(
            f"det_vs_subject must be [D, N] with one column per subject (N = {ref_vs_ref.shape[0]}), "
            f"got shape {tuple(det_vs_subject.shape)}"
        )


def match_detections(det_vs_subject: torch.Tensor) -> list[int]:
    """For ``det_vs_subject  # [N, N]``, the detection matched to each subject: ``matched[j]`` is the
    row given to subject j by the Hungarian assignment that maximises the total similarity."""
    from scipy.optimize import linear_sum_assignment

    rows, columns = linear_sum_assignment(det_vs_subject.detach().double().cpu().numpy(), maximize=True)
    matched = [0] * det_vs_subject.shape[1]
    for row, column in zip(rows, columns):
        matched[column] = int(row)
    return matched


def dnc_score(det_vs_subject: torch.Tensor, ref_vs_ref: torch.Tensor, *, per_entry: bool = False) -> float:
    """D&C of one image: ``1 − ‖S_det[matched] − S_ref‖_F`` clipped to [0, 1], and 0 when the number of
    detections D differs from the number of subjects N (see the module docstring for why this norm).

    ``det_vs_subject  # [D, N]``: similarity of each detection to each subject's references.
    ``ref_vs_ref  # [N, N]``: similarity of each subject's references to each subject's. Computed in
    float64 (the score is a small difference of similarities). ``per_entry`` divides the norm by N
    (the root-mean-square entry difference), for comparisons across numbers of subjects.
    """
    _check_matrices(det_vs_subject, ref_vs_ref)
    subjects = ref_vs_ref.shape[0]
    if det_vs_subject.shape[0] != subjects:
        return 0.0
    detected = det_vs_subject.detach().double().cpu()
    matched = detected[match_detections(detected)]  # [N, N], row j = subject j's detection
    distance = torch.linalg.matrix_norm(matched - ref_vs_ref.detach().double().cpu()).item()
    if per_entry:
        distance /= subjects
    return float(min(1.0, max(0.0, 1.0 - distance)))


def all_subjects_present(det_vs_subject: torch.Tensor) -> bool:
    """Every subject found, each once: as many detections as subjects, and each subject the most
    similar subject of exactly one detection (so two detections of one subject do not count)."""
    detections, subjects = det_vs_subject.shape
    if detections != subjects or subjects == 0:
        return False
    return len(set(det_vs_subject.argmax(dim=1).tolist())) == subjects


def result_from_matrices(
    det_vs_subject: torch.Tensor,
    ref_vs_ref: torch.Tensor,
    *,
    mixed: bool | None = None,
    per_entry: bool = False,
) -> DnCResult:
    """The ``DnCResult`` of one image from its two similarity matrices (``[D, N]`` and ``[N, N]``)."""
    return DnCResult(
        dnc=dnc_score(det_vs_subject, ref_vs_ref, per_entry=per_entry),
        detections=int(det_vs_subject.shape[0]),
        all_present=all_subjects_present(det_vs_subject),
        mixed=mixed,
    )


def reference_similarity(references: Sequence[torch.Tensor]) -> torch.Tensor:
    """``S_ref  # [N, N]`` from unit-norm reference embeddings, one ``[R_j, E]`` tensor per subject:
    the mean cosine between subject j's and subject k's references, over distinct pairs on the
    diagonal (a reference against itself says nothing; 1 when a subject has one reference)."""
    count = len(references)
    matrix = torch.empty(count, count, dtype=torch.float64)
    for j, first in enumerate(references):
        for k, second in enumerate(references):
            cosines = first.double() @ second.double().T  # [R_j, R_k]
            if j == k and first.shape[0] > 1:
                size = first.shape[0]
                matrix[j, k] = (cosines.sum() - cosines.diagonal().sum()) / (size * (size - 1))
            elif j == k:
                matrix[j, k] = 1.0
            else:
                matrix[j, k] = cosines.mean()
    return matrix


def detection_similarity(detections: torch.Tensor, references: Sequence[torch.Tensor]) -> torch.Tensor:
    """``S_det  # [D, N]`` from unit-norm embeddings ``detections  # [D, E]`` and one ``[R_j, E]``
    tensor per subject: the mean cosine of each detection to each subject's references."""
    columns = [detections.double() @ reference.double().T for reference in references]  # [D, R_j] each
    return torch.stack([column.mean(dim=1) for column in columns], dim=1)


# --- the real scorer: OWLv2 + DINOv2 ----------------------------------------------------------------


def to_pil(image: torch.Tensor) -> Image.Image:
    """``image  # [3, H, W] in [0, 1]`` → an 8-bit RGB image (what the models' processors read)."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def crop_to_square(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """The ``box`` (x0, y0, x1, y1 in pixels) of ``image``, padded with white to a square: the
    embedder's processor resizes and centre-crops, which would otherwise cut off part of a tall or
    wide object (the authors' release pads the same way)."""
    width, height = image.size
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(width, max(x0 + 1, math.ceil(box[2]))), min(height, max(y0 + 1, math.ceil(box[3])))
    x0, y0 = min(x0, x1 - 1), min(y0, y1 - 1)
    crop = image.crop((x0, y0, x1, y1))
    side = max(crop.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(crop, ((side - crop.width) // 2, (side - crop.height) // 2))
    return square


class OwlDinoDnC:
    """D&C with OWLv2 detections and DINOv2 comparisons, through transformers (local files only).

    Options:

    - ``detector``: a local folder or cached hub id of ``Owlv2ForObjectDetection`` and its
      processor (default ``"google/owlv2-base-patch16-ensemble"``);
    - ``embedder``: the same for ``Dinov2Model`` and its image processor (default
      ``"facebook/dinov2-base"``);
    - ``checkpoint="tiny-random"``: tiny randomly initialised models of both classes, seeded, for
      tests and CPU smoke runs (overrides ``detector`` and ``embedder``);
    - ``threshold``: the detection score (sigmoid of OWLv2's best class logit) a box needs, 0.4 as in
      the authors' evaluation code (``utils/eval.py``); too low and background boxes break the
      count, too high and a subject drawn small goes missing;
    - ``nms_iou``: boxes overlapping a better one by more than this IoU are dropped, across classes
      (one object is one detection whichever class word it answered); 1 keeps every box. OWLv2
      predicts a box per image patch, so without it a large object counts several times;
    - ``batch_size``: images per detector call and crops per embedder call; ``device``.
    """

    name = "owlv2-dinov2"

    def __init__(
        self,
        detector: str = OWL_ID,
        embedder: str = DINO_ID,
        *,
        checkpoint: str | None = None,
        threshold: float = 0.4,
        nms_iou: float = 0.3,
        batch_size: int = 8,
        device: str = "cpu",
    ):
        if checkpoint not in (None, TINY_RANDOM):
            raise DnCError(
                f"owlv2-dinov2: checkpoint takes only {TINY_RANDOM!r} (tiny random models); name the real "
                f"models with detector=... and embedder=..., got checkpoint={checkpoint!r}"
            )
        if not 0.0 <= float(threshold) <= 1.0 or not 0.0 <= float(nms_iou) <= 1.0:
            raise DnCError(
                f"owlv2-dinov2: threshold and nms_iou are in [0, 1], got threshold={threshold}, nms_iou={nms_iou}"
            )
        if int(batch_size) < 1:
            raise DnCError(f"owlv2-dinov2: batch_size must be at least 1, got {batch_size}")
        self.threshold, self.nms_iou, self.batch_size = float(threshold), float(nms_iou), int(batch_size)
        self.device = torch.device(device)
        if checkpoint == TINY_RANDOM:
            detector, embedder = TINY_RANDOM, TINY_RANDOM
        missing = [
            (role, spec, default)
            for role, spec, default in (("detector", detector, OWL_ID), ("embedder", embedder, DINO_ID))
            if spec != TINY_RANDOM and not _available(spec)
        ]
        if missing:  # both checked before either loads, so one run names everything to fetch
            raise MissingDnCModelError(missing)
        self.owl, self.tokenizer, self.owl_processor = (
            tiny_owl() if detector == TINY_RANDOM else load_owl(detector)
        )
        self.dino, self.dino_processor = tiny_dino() if embedder == TINY_RANDOM else load_dino(embedder)
        self.owl.eval().requires_grad_(False).to(self.device)
        self.dino.eval().requires_grad_(False).to(self.device)
        self._references: tuple[list[SubjectImages], list[torch.Tensor]] | None = None

    def __call__(self, images: torch.Tensor, subjects: list[SubjectImages]) -> list[DnCResult]:
        """``images  # [B, 3, H, W]`` in [0, 1] → one ``DnCResult`` per image."""
        class_words = list(dict.fromkeys(subject.subject.class_word for subject in subjects))
        return self.compare(images, self.detect(images, class_words), subjects)

    @torch.no_grad()
    def detect(self, images: torch.Tensor, class_words: Sequence[str]) -> list[torch.Tensor]:
        """Boxes ``[D, 4]`` (x0, y0, x1, y1 in pixels) per image of objects answering any class word,
        above ``threshold``, after class-agnostic non-maximum suppression, best first."""
        from torchvision.ops import nms

        if not class_words:
            raise DnCError("owlv2-dinov2: no class words to detect; give at least one subject")
        text = self.tokenizer(
            list(class_words),
            padding="max_length",
            truncation=True,
            max_length=self.owl.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self.device)
        boxes: list[torch.Tensor] = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start : start + self.batch_size]
            pixels = self.owl_processor(images=[to_pil(image) for image in batch], return_tensors="pt")
            count = batch.shape[0]
            outputs = self.owl(
                input_ids=text.input_ids.repeat(count, 1),  # [B * Q, L]: the queries of each image
                attention_mask=text.attention_mask.repeat(count, 1),
                pixel_values=pixels["pixel_values"].to(self.device, self.owl.dtype),
            )
            scores = outputs.logits.float().max(dim=-1).values.sigmoid()  # [B, P]
            # OWLv2 pads each image to a square at its bottom and right, and boxes are relative to that
            side = float(max(batch.shape[-2:]))
            centre, size = outputs.pred_boxes.float().split(2, dim=-1)  # [B, P, 2] each
            corners = torch.cat([centre - size / 2, centre + size / 2], dim=-1) * side  # [B, P, 4]
            for image_scores, image_boxes in zip(scores, corners):
                keep = image_scores > self.threshold
                kept_boxes, kept_scores = image_boxes[keep], image_scores[keep]
                order = nms(kept_boxes, kept_scores, self.nms_iou) if self.nms_iou < 1.0 else None
                if order is None:
                    order = kept_scores.argsort(descending=True)
                boxes.append(kept_boxes[order].cpu())
        return boxes

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-norm DINOv2 CLS embeddings ``[K, E]`` of RGB images, ``batch_size`` at a time."""
        parts = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.dino_processor(
                images=list(images[start : start + self.batch_size]), return_tensors="pt"
            )
            output = self.dino(pixel_values=pixels["pixel_values"].to(self.device, self.dino.dtype))
            parts.append(F.normalize(output.pooler_output.float(), dim=-1).cpu())  # pooler = normed CLS
        return torch.cat(parts) if parts else torch.empty(0, self.dino.config.hidden_size)

    def reference_embeddings(self, subjects: list[SubjectImages]) -> list[torch.Tensor]:
        """One ``[R_j, E]`` tensor per subject, kept for the next call with the same subjects (a folder
        of images is scored in batches against the same references)."""
        cached = self._references
        if (
            cached is not None
            and len(cached[0]) == len(subjects)
            and all(map(operator.is_, cached[0], subjects))
        ):
            return cached[1]
        for subject in subjects:
            if not subject.images:
                raise DnCError(f"subject {subject.subject.token!r} has no reference images")
        embeddings = [self.embed([image.convert("RGB") for image in subject.images]) for subject in subjects]
        self._references = (list(subjects), embeddings)
        return embeddings

    def compare(
        self, images: torch.Tensor, boxes: Sequence[torch.Tensor], subjects: list[SubjectImages]
    ) -> list[DnCResult]:
        """The D&C of each image given its boxes ``[D, 4]`` (from ``detect``, or any other detector)."""
        if not subjects:
            raise DnCError("D&C needs at least one subject")
        references = self.reference_embeddings(subjects)
        ref_vs_ref = reference_similarity(references)
        results = []
        for image, image_boxes in zip(images, boxes):
            picture = to_pil(image)
            crops = [crop_to_square(picture, box.tolist()) for box in image_boxes]
            det_vs_subject = detection_similarity(self.embed(crops), references)  # [D, N]
            results.append(result_from_matrices(det_vs_subject, ref_vs_ref))
        return results


class MissingDnCModelError(MissingCheckpointError):
    """OWLv2 or DINOv2 weights are not on this machine; the message names each and how to get it.

    A ``MissingCheckpointError``, so that code catching a missing reward checkpoint catches this
    too, with a message that speaks of the scorer's options rather than of a reward's ``build``."""

    def __init__(self, missing: list[tuple[str, str, str]]):  # (role, spec, default hub id) each
        self.reward = OwlDinoDnC.name
        self.missing = ", ".join(spec for _, spec, _ in missing)
        lines = [
            f"D&C scorer {OwlDinoDnC.name!r} cannot find "
            + " nor ".join(f"its {role} {spec!r}" for role, spec, _ in missing)
            + " in the Hugging Face cache or as a local folder (diffalign reads local files only and never "
            "downloads weights). To provide " + ("them" if len(missing) > 1 else "it") + ":"
        ]
        for role, spec, default in missing:
            hub_id = spec if _looks_like_hub_id(spec) else default
            lines.append(
                f"  - the {role}: on a machine with internet run `hf download {hub_id}`, then bring the Hugging "
                f"Face cache here (or set HF_HOME), or pass the downloaded folder: --option {role}=/path/to/"
                f"{hub_id.rsplit('/', 1)[-1]} (Python: OwlDinoDnC({role}=...))"
            )
        lines.append(
            f"For tests and CPU smoke runs, --option checkpoint={TINY_RANDOM} (Python: "
            f"OwlDinoDnC(checkpoint={TINY_RANDOM!r})) builds tiny random models of the same classes instead."
        )
        RewardError.__init__(self, "\n".join(lines))  # skips the parent's wording, written for rewards


def _looks_like_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


def _available(spec: str) -> bool:
    """Whether ``spec`` is a local folder or a hub id with a config in the local cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    if Path(spec).expanduser().is_dir():
        return True
    try:
        hf_hub_download(spec, "config.json", local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return False
    return True


def load_owl(spec: str) -> tuple[Any, Any, Any]:
    """OWLv2 from a local folder or the Hugging Face cache: (model, tokenizer, image processor)."""
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    try:
        processor = Owlv2Processor.from_pretrained(spec, local_files_only=True)
        model = Owlv2ForObjectDetection.from_pretrained(spec, local_files_only=True)
    except OSError as error:  # a config without weights or processor files
        raise MissingDnCModelError([("detector", spec, OWL_ID)]) from error
    return model, processor.tokenizer, processor.image_processor


def load_dino(spec: str) -> tuple[Any, Any]:
    """DINOv2 from a local folder or the Hugging Face cache: (model, image processor)."""
    from transformers import AutoImageProcessor, Dinov2Model

    try:
        processor = AutoImageProcessor.from_pretrained(spec, local_files_only=True)
        model = Dinov2Model.from_pretrained(spec, local_files_only=True)
    except OSError as error:
        raise MissingDnCModelError([("embedder", spec, DINO_ID)]) from error
    return model, processor


def tiny_owl() -> tuple[Any, Any, Any]:
    """A seeded tiny random ``Owlv2ForObjectDetection`` (32-pixel images, 16 patches, so 16 boxes)
    with the real CLIP tokenizer and a matching image processor."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor

    from diffalign.tokenizer import clip_tokenizer

    length = 16  # OWLv2's query length
    tokenizer = clip_tokenizer(model_max_length=length)
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = Owlv2Config(
        text_config={
            **layers,
            "vocab_size": tokenizer.vocab_size,
            "max_position_embeddings": length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**layers, "image_size": TINY_IMAGE_SIZE, "patch_size": 8},
        projection_dim=32,
    )
    with seeded():
        model = Owlv2ForObjectDetection(config)
    processor = Owlv2ImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return model, tokenizer, processor


def tiny_dino() -> tuple[Any, Any]:
    """A seeded tiny random ``Dinov2Model`` with a matching image processor."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
    )
    with seeded():
        model = Dinov2Model(config)
    processor = BitImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_mean=[0.485, 0.456, 0.406],  # ImageNet's, as DINOv2's processor
        image_std=[0.229, 0.224, 0.225],
    )
    return model, processor


# --- scoring a folder ----------------------------------------------------------------------------


def scorer_names() -> list[str]:
    """Every registered D&C scorer."""
    return registry.DNC_SCORERS.names()


def build(name: str, **options: Any) -> DnCScorer:
    """The D&C scorer registered as ``name`` (``owlv2-dinov2``, a world's own ...), built with ``options``."""
    entry = registry.DNC_SCORERS.get(name)
    if entry is None:
        names = scorer_names()
        raise DnCError(
            f"unknown D&C scorer {name!r}.{registry.suggestion(name, names)} Available: {', '.join(names)}."
        )
    try:
        return entry.make(**options)
    except TypeError as error:
        if "unexpected keyword argument" not in str(error):
            raise
        raise DnCError(
            f"D&C scorer {name!r} does not take an option given: {error}. Options are the keyword arguments "
            f"of the scorer's class ({OwlDinoDnC.name}: detector, embedder, checkpoint, threshold, nms_iou, "
            "batch_size, device)"
        ) from error


def summarise(results: Sequence[DnCResult]) -> dict[str, Any]:
    """Mean D&C, the share of images with every subject present once, and the mixing rate (the share
    of images with a mixed detection, None when the scorer cannot tell)."""
    told = [result.mixed for result in results if result.mixed is not None]
    return {
        "images": len(results),
        "mean_dnc": float(np.mean([result.dnc for result in results])) if results else None,
        "all_present": float(np.mean([result.all_present for result in results])) if results else None,
        "mixing_rate": float(np.mean(told)) if told else None,
    }


OUTPUT_FILES = ("dnc.json", "dnc.csv")


def check_folder(
    images_dir: str | Path, output: str | Path, *, overwrite: bool = False
) -> tuple[list[Path], list[Path]]:
    """The images to score and the files to write, or an error before any model is loaded: no images,
    or outputs that exist (without ``overwrite``) or cannot be written."""
    from diffalign import images as image_io
    from diffalign import outputs

    paths = image_io.list_images(images_dir)
    if not paths:
        raise DnCError(f"{str(images_dir)!r} holds no images (PNG, JPEG, WebP, BMP or TIFF) to score")
    output = Path(output).expanduser()
    targets = outputs.check_output_files(
        [output / name for name in OUTPUT_FILES], inputs=paths, overwrite=overwrite, what="D&C output"
    )
    return paths, targets


def evaluate_folder(
    images_dir: str | Path,
    subjects: list[SubjectImages],
    scorer: DnCScorer,
    output: str | Path,
    *,
    batch_size: int = 8,
    overwrite: bool = False,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score every image in ``images_dir`` and write ``dnc.json`` (summary, settings and one row per
    image) and ``dnc.csv`` (one row per image) into ``output``; returns what ``dnc.json`` holds.

    Existing outputs are refused unless ``overwrite``, before any image is scored. Consecutive images
    of the same size go to the scorer together, ``batch_size`` at a time.
    """
    from diffalign import images as image_io
    from diffalign import outputs

    if not subjects:
        raise DnCError("D&C needs at least one subject")
    paths, targets = check_folder(images_dir, output, overwrite=overwrite)
    results: list[DnCResult] = []
    batch: list[torch.Tensor] = []
    for path in paths:
        image = image_io.load_image(path)
        if batch and (image.shape != batch[0].shape or len(batch) == batch_size):
            results += scorer(torch.stack(batch), subjects)
            batch = []
        batch.append(image)
    results += scorer(torch.stack(batch), subjects)

    rows = [{"image": path.name, **asdict(result)} for path, result in zip(paths, results)]
    report = {
        "scorer": scorer.name,
        "subjects": [
            {
                "identifier": s.subject.identifier,
                "class_word": s.subject.class_word,
                "references": len(s.images),
            }
            for s in subjects
        ],
        "settings": settings or {},
        "summary": summarise(results),
        "images": rows,
    }
    targets[0].parent.mkdir(parents=True, exist_ok=True)
    outputs.write_text(targets[0], json.dumps(report, indent=2) + "\n")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["image", "dnc", "detections", "all_present", "mixed"])
    writer.writeheader()
    writer.writerows(rows)
    outputs.write_text(targets[1], table.getvalue())
    return report


def format_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    summary = report["summary"]
    mixing = (
        "not measured by this scorer" if summary["mixing_rate"] is None else f"{summary['mixing_rate']:.3f}"
    )
    return (
        f"D&C ({report['scorer']}) over {summary['images']} images: mean {summary['mean_dnc']:.4f}, "
        f"all subjects present once in {summary['all_present']:.1%}, mixing rate {mixing}"
    )
