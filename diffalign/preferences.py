"""Preference data: pairs of images of one prompt, the preferred one first.

CONTRACT (skeleton; the implementation is being written — see the function docstrings).

Three sources, one type (``PreferenceData``) for everything that reads them (``method: dpo``,
``diffalign.fifa``):

- **Pick-a-Pic v2 as distributed**: parquet shards (a file, or a folder of ``*.parquet``) with
  the columns ``caption``, ``jpg_0``, ``jpg_1`` (encoded image bytes, any format PIL reads),
  ``label_0``, ``label_1``. Ties (``label_0 == 0.5``) are dropped and counted; the winner is put
  first. Shards are read lazily: the index reads only the caption and label columns; images are
  read (by row group) and decoded only when pairs are fetched. Other columns ride along in
  ``PreferencePair.extra``.
- **JSONL** for users' own data: one ``{"prompt": ..., "chosen": PATH, "rejected": PATH}`` per
  line, paths relative to the file's folder (or absolute). Other keys ride along in ``extra``.
- **A registered name** (``diffalign.registry.register_preference_set``), e.g. ``shapes-prefs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from diffalign.errors import DiffalignError


class PreferenceDataError(DiffalignError, ValueError):
    """Preference data that cannot be read as given; the message names the file and row (or line)."""


@dataclass(frozen=True)
class PreferencePair:
    """One labelled comparison: ``chosen`` was preferred to ``rejected`` for ``prompt``."""

    prompt: str
    chosen: Image.Image  # RGB
    rejected: Image.Image  # RGB
    source: str  # where it came from, for messages: "shard-000.parquet row 17", "data.jsonl line 3"
    extra: dict[str, Any] = field(default_factory=dict)  # other columns / keys, passed through


@dataclass
class ReadStats:
    """What reading a source kept and dropped."""

    rows: int = 0  # rows (lines) read
    ties: int = 0  # dropped: label_0 == label_1 == 0.5
    kept: int = 0  # pairs in the data


class PreferenceData(Protocol):
    """Pairs by index, images decoded only when asked for."""

    format: str  # "pickapic" | "jsonl"
    location: Path  # the file or folder read
    stats: ReadStats

    def __len__(self) -> int: ...

    def prompts(self) -> list[str]:
        """Every pair's prompt, in index order, without decoding an image."""
        ...

    def pairs(self, indices: Sequence[int]) -> list[PreferencePair]:
        """The pairs at ``indices`` (any order, repeats allowed), images decoded."""
        ...


def open_preferences(spec: str | Path, *, model: str | None = None) -> PreferenceData:
    """The preference data named by ``spec``: a registered name, a ``.jsonl`` file, a ``.parquet``
    file or a folder of parquet shards. Raises ``PreferenceDataError`` naming the shard and row (or
    line) for a missing column, an undecodable image, a label outside {0, 0.5, 1}, and an empty
    data set after dropping ties."""
    raise NotImplementedError


def write_subset(data: PreferenceData, indices: Sequence[int], output: str | Path) -> Path:
    """Write the pairs at ``indices`` of ``data`` to ``output`` in ``data``'s own format (parquet rows
    copied as they are; JSONL lines with their image paths still valid from the new location).
    Refuses to overwrite an existing file; writes atomically."""
    raise NotImplementedError
