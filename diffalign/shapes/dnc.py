"""``shapes-exact``: MuDI's Detect-and-Compare (D&C) on ShapesWorld, from the exact identity detector.

MuDI (Jang et al., NeurIPS 2024, arXiv 2404.04243) scores a multi-subject image by detecting the
objects of the subjects' classes, comparing each detection with each subject (S_det) and the
subjects with each other (S_ref), and asking that the two matrices agree. On real images the
similarities come from an image embedder; on ShapesWorld they are exact. The similarity of two looks
is the share of the four traits they agree on (shape, body colour, marking, marking colour;
``identities.similarity``): 1 for the same identity, 0.5 within a similar pair, 0 within a
dissimilar one, 0.75 from an object mixing a similar pair to either subject.

The score is the paper's, computed by ``diffalign.dnc.result_from_matrices`` from these exact
matrices, so a D&C here and one from the real scorer (``owlv2-dinov2``) are the same formula:
0 when the number of detections of the subjects' classes is not N (a subject missing, or an extra
one); otherwise the detections are matched to the subjects (Hungarian) and D&C = max(0, 1 −
‖S_det[matched] − S_ref‖_F). Worked values for two subjects: a faithful image 1; a similar pair's
subject drawn twice 1 − √0.5 = 0.29 (its row [1, 0.5] stands where [0.5, 1] should), a dissimilar
pair's 0; one mixed object of a similar pair 1 − √(2·0.25²) = 0.65.

Because D&C grades a duplicate of a *similar* subject above zero, the study's headline is exact and
not D&C: ``all_present`` (each subject detected exactly once, every trait read) and ``mixed`` (an
object carrying traits of two subjects), which only a world with an exact detector can give.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from diffalign.dnc import DnCResult, result_from_matrices
from diffalign.shapes.identities import (
    CATALOGUE,
    Identity,
    IdentityDetection,
    detect_identities,
    read_objects,
    similarity,
)
from diffalign.subjects import SubjectError, SubjectImages


class ShapesDnC:
    """The exact D&C scorer of ShapesWorld (the ``DnCScorer`` protocol of ``diffalign.dnc``).

    A subject is a catalogued identity when its identifier is one (``zog``); any other subject's
    look is read from its reference images by the same detector (every reference must show one
    object with a marking, and they must agree)."""

    name = "shapes-exact"

    def __init__(self, catalogue: Sequence[Identity] | None = None):
        known = CATALOGUE.values() if catalogue is None else catalogue
        self._by_identifier = {i.identifier: i for i in known}

    def __call__(self, images: torch.Tensor, subjects: list[SubjectImages]) -> list[DnCResult]:
        """``images  # [B, 3, H, W]`` in [0, 1] → one ``DnCResult`` per image."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        if not subjects:
            raise ValueError("D&C needs at least one subject")
        identities = self.identities(subjects)
        pixels = images.detach().float().cpu().numpy()
        return [score_detections(detect_identities(image, identities), identities) for image in pixels]

    def identities(self, subjects: list[SubjectImages]) -> list[Identity]:
        """Each subject's identity: the catalogued one of its identifier, else read from its images."""
        found = []
        for item in subjects:
            subject = item.subject
            known = self._by_identifier.get(subject.identifier)
            ident = known if known is not None else _read_identity(item)
            if ident.class_word != subject.class_word:
                raise SubjectError(
                    f"subject {subject.token!r}: the identifier {subject.identifier!r} is a "
                    f"{ident.class_word}, not a {subject.class_word}; name it {ident.token!r}"
                )
            found.append(ident)
        if len({i.traits for i in found}) < len(found):
            raise SubjectError("two subjects have the same look; D&C cannot tell them apart")
        return found


def score_detections(detections: list[IdentityDetection], identities: Sequence[Identity]) -> DnCResult:
    """The D&C verdict (see the module doc) for the detections of one image: the paper's score from
    the exact similarity matrices, with exact presence and mixing."""
    classes = {i.class_word for i in identities}
    relevant = [d for d in detections if d.shape in classes]
    counts = Counter(d.identity for d in relevant)
    reference = torch.tensor([[similarity(a, b) for b in identities] for a in identities])  # S_ref [N, N]
    observed = torch.tensor([[similarity(d.traits, b) for b in identities] for d in relevant])  # S_det [D, N]
    result = result_from_matrices(observed.reshape(len(relevant), len(identities)), reference)
    return dataclasses.replace(
        result,
        all_present=all(counts[i.name] == 1 for i in identities),
        mixed=any(d.mixed for d in relevant),
    )


def _read_identity(item: SubjectImages) -> Identity:
    """A subject's look read from its references by the exact detector."""
    subject = item.subject
    looks = []
    for k, image in enumerate(item.images):
        objects = read_objects(np.asarray(image.convert("RGB")))
        if len(objects) != 1:
            raise SubjectError(
                f"subject {subject.token!r}: reference image {k} shows {len(objects)} objects, not one; "
                "ShapesWorld reads a subject's look from references of one object each "
                "(write them with diffalign.shapes.identities.write_subject_folder)"
            )
        looks.append(objects[0][0])
    if not looks:
        raise SubjectError(f"subject {subject.token!r} has no reference images")
    (traits, votes), *_ = Counter(looks).most_common(1)
    if votes < len(looks) or traits.marking in (None, "unknown"):
        raise SubjectError(
            f"subject {subject.token!r}: its references do not show one marked ShapesWorld look "
            f"(read {sorted(set(map(repr, looks)))}); use a catalogued identifier "
            f"({', '.join(i.identifier for i in CATALOGUE.values())}) or references of one identity"
        )
    return Identity(subject.identifier, subject.identifier, *traits.slots())
