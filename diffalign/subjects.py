"""Subjects to personalise a model on: a few images of one thing, an identifier and a class word.

A subject is given as a folder of a few images (optionally a mask per image, ``NAME.mask.png``
beside ``NAME.png``, white = the subject) with an identifier and a class word — ``olis toy``,
``hta dog`` — as DreamBooth (Ruiz et al. 2023) and MuDI (Jang et al. 2024) name them. The
identifier is a rare token the prompt uses for the subject; the class word is what it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from diffalign.errors import DiffalignError


class SubjectError(DiffalignError, ValueError):
    """A subject cannot be used as given (empty folder, unreadable image, mask of another size,
    identifier colliding with a common word or another subject); nothing was written."""


@dataclass(frozen=True)
class Subject:
    """One subject as the user names it."""

    identifier: str  # "olis"
    class_word: str  # "toy"
    folder: Path

    @property
    def token(self) -> str:
        """How prompts name it: ``"olis toy"``."""
        return f"{self.identifier} {self.class_word}"


@dataclass
class SubjectImages:
    """A subject's reference images (RGB) and their masks (mode "L", white = subject; None when the
    user gave none and no segmentation model has made one yet)."""

    subject: Subject
    images: list[Image.Image]
    masks: list[Image.Image | None] = field(default_factory=list)


# A few hundred of the most frequent English words, with the words image prompts lean on most
# (colours, numbers, places, photo words). An identifier must not be one of them: DreamBooth
# (Ruiz et al. 2023) binds the subject to a *rare* token because fine-tuning on a
# word the model already knows ("red", "photo") drags that word's meaning along and overwrites
# it in every other prompt. The list is a start, not a dictionary; see ``check_identifiers``.
_COMMON_WORDS_TEXT = """
    a about above across after again against all also an and another any are around as at away back
    be because been before behind being below beside between big both but by can could day did do does
    down during each even every far few for from front good great had has have he her here high him his
    how i if in inside into is it its just large last left like little long look made make many may me
    more most much my near new next no not now of off old on once one only or other our out outside over
    own part people photo picture image painting drawing sketch render style art portrait close up shot
    right same see she should side small so some such take than that the their them then there these they
    thing this those through to too top two three four five under up us very was way we well were what
    when where which while who why will with without would you your
    red orange yellow green blue purple pink brown black white gray grey gold silver colour color
    circle square triangle shape shapes object objects
    man woman boy girl person child baby cat dog bird car house tree flower toy teddy bear ball cup
    water sky sun beach city street room table chair bed book hat shirt face hand head eye
"""
COMMON_WORDS: frozenset[str] = frozenset(_COMMON_WORDS_TEXT.split())
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MASK_SUFFIX = ".mask.png"
_IDENTIFIER = re.compile(r"^[a-z0-9]+$")
_CLASS_WORD = re.compile(r"^[a-z][a-z ]*[a-z]$|^[a-z]$")


def check_identifiers(subjects: Sequence[Subject], *, reserved: Iterable[str] = ()) -> None:
    """Refuse identifiers a model cannot learn a subject from (``SubjectError``, one line each).

    Checked, case-insensitively, for each subject:

    - the identifier is one word of letters and digits (``olis``, ``hta``, ``sks``) and the
      class word one or more words of letters (``toy``, ``teddy bear``);
    - the identifier is not a common word (``COMMON_WORDS``), not a word of ``reserved`` (the
      caller passes the vocabulary of the model's world: ``personalize`` gives every word of the
      prompt sets registered for the model), and not the class word of any subject;
    - no two subjects share an identifier (their tokens would name both at once).
    """
    reserved_words = {word.lower() for word in reserved}
    class_words = {word for subject in subjects for word in subject.class_word.lower().split()}
    seen: dict[str, Subject] = {}
    for subject in subjects:
        identifier, class_word = subject.identifier.lower(), subject.class_word.lower()
        if not _IDENTIFIER.match(identifier):
            raise SubjectError(
                f"identifier {subject.identifier!r} must be one word of letters and digits (e.g. 'olis', 'sks'); "
                "the prompt names the subject as '<identifier> <class word>'"
            )
        if not _CLASS_WORD.match(class_word):
            raise SubjectError(
                f"class word {subject.class_word!r} of {subject.identifier!r} must be letters (e.g. 'toy', 'dog', "
                "'teddy bear'): what the subject is, as the base model knows it"
            )
        if identifier in class_words:
            raise SubjectError(
                f"identifier {subject.identifier!r} is a class word of these subjects; an identifier must be a "
                "rare word the model does not know yet (e.g. 'olis', 'hta', 'sks'), different from every class word"
            )
        if identifier in COMMON_WORDS or identifier in reserved_words:
            where = "a common English word" if identifier in COMMON_WORDS else "a word of the model's prompts"
            raise SubjectError(
                f"identifier {subject.identifier!r} is {where}: training would rebind it and change every prompt "
                "that uses it. Choose a rare word the model does not know (e.g. 'olis', 'hta', 'sks')"
            )
        if identifier in seen:
            other = seen[identifier]
            raise SubjectError(
                f"identifier {subject.identifier!r} is given to two subjects ({other.folder} and "
                f"{subject.folder}); give each subject its own identifier"
            )
        seen[identifier] = subject


def load_subjects(
    specs: Sequence[tuple[str, str, str | Path]], *, reserved: Iterable[str] = ()
) -> list[SubjectImages]:
    """``[(identifier, class_word, folder), ...]`` → the subjects' images and masks, validated.

    Everything is checked before anything is returned, so a caller that loads its subjects first
    has written nothing when one is refused (``SubjectError``, one line naming the file):
    identifiers (``check_identifiers``), then each folder — it exists and holds at least one
    image (``IMAGE_SUFFIXES``; other files and hidden files are ignored), every image opens and
    decodes, every mask ``NAME.mask.png`` opens, belongs to an image ``NAME.<suffix>``, has its
    image's size and marks at least one pixel (white = the subject). Images are returned as RGB,
    masks as mode "L"; an image without a mask has ``None``.
    """
    subjects = [
        Subject(str(identifier), str(class_word), Path(folder)) for identifier, class_word, folder in specs
    ]
    if not subjects:
        raise SubjectError("no subjects given; give at least one (identifier, class word, folder)")
    check_identifiers(subjects, reserved=reserved)
    return [_load_folder(subject) for subject in subjects]


def _load_folder(subject: Subject) -> SubjectImages:
    folder = subject.folder.expanduser()
    label = f"subject {subject.token!r}"
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise SubjectError(f"{label}: {str(folder)!r} {what}; give a folder of a few images of the subject")
    files = sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))
    masks = {
        path.name[: -len(MASK_SUFFIX)]: path for path in files if path.name.lower().endswith(MASK_SUFFIX)
    }
    images = [path for path in files if path.suffix.lower() in IMAGE_SUFFIXES and path not in masks.values()]
    if not images:
        raise SubjectError(
            f"{label}: folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); put a few "
            "pictures of the subject in it (3-5 is DreamBooth's usual number)"
        )
    stems: dict[str, Path] = {}
    for path in images:
        if path.stem in stems:
            raise SubjectError(
                f"{label}: {stems[path.stem].name} and {path.name} share the name {path.stem!r}, so the mask "
                f"{path.stem}{MASK_SUFFIX} would fit either; rename one of them"
            )
        stems[path.stem] = path
    for stem, mask in masks.items():
        if stem not in stems:
            raise SubjectError(
                f"{label}: mask {str(mask)!r} has no image {stem}.png (or .jpg, ...) beside it; a mask "
                f"NAME{MASK_SUFFIX} belongs to the image NAME.png"
            )
    loaded, loaded_masks = [], []
    for path in images:
        image = _open(path, label, "image").convert("RGB")
        mask = None
        if path.stem in masks:
            mask_path = masks[path.stem]
            mask = _open(mask_path, label, "mask").convert("L")
            if mask.size != image.size:
                raise SubjectError(
                    f"{label}: mask {str(mask_path)!r} is {mask.size[0]}x{mask.size[1]} but its image "
                    f"{path.name} is {image.size[0]}x{image.size[1]}; a mask must have its image's size"
                )
            if mask.getextrema()[1] < 128:
                raise SubjectError(
                    f"{label}: mask {str(mask_path)!r} marks no pixel (white = the subject); fix it or remove it"
                )
        loaded.append(image)
        loaded_masks.append(mask)
    return SubjectImages(subject, loaded, loaded_masks)


def _open(path: Path, label: str, what: str) -> Image.Image:
    """``path`` opened and fully decoded, or a ``SubjectError`` naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise SubjectError(
            f"{label}: cannot read {what} {str(path)!r} ({type(error).__name__}: {error}); replace it with a "
            "readable PNG or JPEG, or remove it"
        ) from error
