"""Preference data: pairs of images of one prompt, the preferred one first.

Offline methods (``method: dpo``, ``diffalign.fifa``) learn from comparisons someone already
made, so they need the comparisons in one shape whatever file they came in. This module is that
one shape (``PreferenceData`` of ``PreferencePair``) and the readers and writers behind it:

- **Pick-a-Pic v2 as distributed**: parquet shards (a file, or a folder of ``*.parquet``, read in
  name order) with the columns ``caption``, ``jpg_0``, ``jpg_1`` (encoded image bytes, any format
  PIL reads), ``label_0``, ``label_1``. Ties (``label_0 == label_1 == 0.5``) teach DPO nothing
  about which image is better, so they are dropped and counted; the winner is put first. The
  real data set is hundreds of gigabytes, so shards are read lazily: the index reads only the
  caption and label columns, and images are read (one row group at a time) and decoded only
  when pairs are fetched. Other columns ride along in ``PreferencePair.extra``.
- **JSONL** for users' own data: one ``{"prompt": ..., "chosen": PATH, "rejected": PATH}`` per
  line, paths relative to the file's folder (or absolute). Other keys ride along in ``extra``.
- **A registered name** (``diffalign.registry.register_preference_set``), e.g. ``shapes-prefs``;
  a set written for some models only is refused for others, as prompt sets are.

``write_subset`` writes the pairs a filter (FiFA) kept in the format they came in, so the subset
opens like the original; ``write_pickapic`` and ``encode_png`` build Pick-a-Pic shards (how a
world ships its own preference set). Every error names the file and row (or line), says what
was expected and how to fix it.
"""

from __future__ import annotations

import bisect
import io
import json
from array import array
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from diffalign import outputs, registry
from diffalign.errors import DiffalignError

if TYPE_CHECKING:
    import pyarrow as pa


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


# --- shared helpers ------------------------------------------------------------------------------


def _decode(data: Any, where: str, what: str) -> Image.Image:
    """``data`` (encoded bytes or a path) decoded to RGB, or an error naming ``where`` and ``what``."""
    try:
        source = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
        if source is None:
            raise ValueError("it is empty (null)")
        with Image.open(source) as image:
            return image.convert("RGB")  # convert loads the pixels, so a truncated file fails here
    except Exception as error:  # PIL raises many types for bad data; all mean the same thing here
        raise PreferenceDataError(
            f"{where}: {what} is not a readable image ({type(error).__name__}: {error}); expected an "
            "encoded image PIL opens (JPEG, PNG, WebP, ...). Re-encode or remove this pair."
        ) from error


def _check_index(index: int, length: int) -> int:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < length:
        raise IndexError(
            f"pair index {index!r} is out of range: the data holds {length} pairs (0..{length - 1})"
        )
    return index


def encode_png(image: Image.Image) -> bytes:
    """``image`` as PNG bytes: lossless, so pixels written into a shard read back exactly."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _new_output(output: str | Path, suffix: str, what: str) -> Path:
    """``output`` if a subset may be written there: the right suffix, not an existing file."""
    output = Path(output).expanduser()
    if output.suffix.lower() != suffix:
        raise PreferenceDataError(
            f"cannot write {what} to {str(output)!r}: give a path ending in {suffix}, so open_preferences "
            "reads it back in the same format (nothing was written)"
        )
    if output.exists():
        raise PreferenceDataError(
            f"{str(output)!r} already exists; write_subset never replaces a file: choose another name or "
            "remove it first (nothing was written)"
        )
    try:
        outputs.check_writable_folder(output.parent)
    except outputs.OutputError as error:
        raise PreferenceDataError(f"{error} (nothing was written)") from error
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


# --- Pick-a-Pic v2 (parquet) ---------------------------------------------------------------------

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
_INDEX_COLUMNS = ["caption", "label_0", "label_1"]
_IMAGE_COLUMNS = ["jpg_0", "jpg_1"]
_LABELS = (0.0, 0.5, 1.0)


class PickapicData:
    """Pick-a-Pic v2 shards, indexed on open from the caption and label columns only.

    Kept pairs are numbered across the shards in name order, then row order. Fetching pairs
    reads each row group that holds one of them once per call (image and extra columns only)
    and keeps nothing between calls, so memory stays at the row groups one call needs.

    A pair's ``extra`` holds the row's other columns as stored, plus ``chosen_side`` (0: ``jpg_0``
    won, 1: ``jpg_1`` won), so per-image columns such as ``oracle_0`` / ``oracle_1`` can be matched
    to ``chosen`` and ``rejected``.
    """

    format = "pickapic"

    def __init__(self, location: Path, shards: list[Path]):
        import pyarrow.parquet as pq

        self.location = location
        self.shards = shards
        self.stats = ReadStats()
        self._prompts: list[str] = []
        # Per kept pair: its shard, its row in the shard, and which image won (0: jpg_0, 1: jpg_1).
        self._shard = array("I")
        self._row = array("Q")
        self._winner = array("B")
        self._group_starts: list[list[int]] = []  # per shard: first row of each row group
        self._extra_columns: list[list[str]] = []  # per shard, in the shard's column order
        for number, shard in enumerate(shards):
            try:
                parquet = pq.ParquetFile(shard)
            except Exception as error:  # pyarrow: ArrowInvalid, OSError for a file that is not parquet
                raise PreferenceDataError(
                    f"{shard}: not a readable parquet file ({error}); Pick-a-Pic data is parquet shards with "
                    "the columns caption, jpg_0, jpg_1, label_0, label_1"
                ) from error
            names = parquet.schema_arrow.names
            missing = [name for name in PICKAPIC_COLUMNS if name not in names]
            if missing:
                raise PreferenceDataError(
                    f"{shard.name}: missing column(s) {', '.join(missing)}; Pick-a-Pic v2 shards have "
                    f"{', '.join(PICKAPIC_COLUMNS)} and this one has {', '.join(names) or 'none'}. Rename the "
                    'columns, or write your pairs as JSONL ({"prompt", "chosen", "rejected"} per line).'
                )
            self._extra_columns.append([name for name in names if name not in PICKAPIC_COLUMNS])
            starts, total = [], 0
            for group in range(parquet.num_row_groups):
                starts.append(total)
                total += parquet.metadata.row_group(group).num_rows
            self._group_starts.append(starts)
            self._index_shard(number, shard, parquet)
        if not self._prompts:
            rows = self.stats.rows
            detail = f"all {rows} rows were ties (label_0 == label_1 == 0.5)" if rows else "there are no rows"
            raise PreferenceDataError(
                f"{location}: no preference pairs: {detail}. DPO needs pairs with a winner (labels 1 and 0)."
            )
        self.stats.kept = len(self._prompts)

    def _index_shard(self, number: int, shard: Path, parquet: Any) -> None:
        row = 0
        for batch in parquet.iter_batches(columns=_INDEX_COLUMNS, batch_size=4096):
            captions, first, second = (batch.column(name).to_pylist() for name in _INDEX_COLUMNS)
            for caption, label_0, label_1 in zip(captions, first, second, strict=True):
                where = f"{shard.name} row {row}"
                if label_0 not in _LABELS or label_1 not in _LABELS or label_0 + label_1 != 1:
                    raise PreferenceDataError(
                        f"{where}: labels label_0={label_0!r}, label_1={label_1!r}; expected 1 and 0 (image 0 "
                        "won), 0 and 1 (image 1 won) or 0.5 and 0.5 (a tie). Fix or remove this row."
                    )
                if not isinstance(caption, str):
                    raise PreferenceDataError(f"{where}: caption is {caption!r}; expected the prompt as text")
                self.stats.rows += 1
                if label_0 == 0.5:
                    self.stats.ties += 1
                else:
                    self._prompts.append(caption)
                    self._shard.append(number)
                    self._row.append(row)
                    self._winner.append(0 if label_0 == 1 else 1)
                row += 1

    def __len__(self) -> int:
        return len(self._prompts)

    def __repr__(self) -> str:
        return f"PickapicData({str(self.location)!r}, {len(self)} pairs, {self.stats.ties} ties dropped)"

    def prompts(self) -> list[str]:
        return list(self._prompts)

    def _read_row_group(self, shard: int, group: int, columns: list[str] | None) -> pa.Table:
        """One row group of one shard (only ``columns``; None: all): the one place images are read."""
        import pyarrow.parquet as pq

        with pq.ParquetFile(self.shards[shard]) as parquet:
            return parquet.read_row_group(group, columns=columns)

    def _by_row_group(self, indices: Sequence[int]) -> dict[tuple[int, int], list[tuple[int, int]]]:
        """The requested pairs grouped by (shard, row group): (position in ``indices``, row in the group)."""
        groups: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        for position, index in enumerate(indices):
            index = _check_index(index, len(self))
            shard, row = self._shard[index], self._row[index]
            starts = self._group_starts[shard]
            group = bisect.bisect_right(starts, row) - 1
            groups[shard, group].append((position, row - starts[group]))
        return groups

    def pairs(self, indices: Sequence[int]) -> list[PreferencePair]:
        indices = list(indices)
        found: list[PreferencePair | None] = [None] * len(indices)
        for (shard, group), wanted in self._by_row_group(indices).items():
            extras = self._extra_columns[shard]
            table = self._read_row_group(shard, group, _IMAGE_COLUMNS + extras)
            columns = {name: table.column(name) for name in _IMAGE_COLUMNS + extras}
            for position, local in wanted:
                index = indices[position]
                where = f"{self.shards[shard].name} row {self._row[index]}"
                winner = self._winner[index]
                images = [
                    _decode(columns[f"jpg_{side}"][local].as_py(), where, f"column jpg_{side}")
                    for side in (0, 1)
                ]
                extra = {name: columns[name][local].as_py() for name in extras}
                # Per-image columns (oracle_0, oracle_1, ...) follow the shard's order; this says which won.
                extra["chosen_side"] = winner
                found[position] = PreferencePair(
                    self._prompts[index], images[winner], images[1 - winner], where, extra
                )
        return found  # type: ignore[return-value]  # every position was filled

    def _write_subset(self, indices: Sequence[int], output: Path) -> None:
        """The rows at ``indices`` copied verbatim (all columns, original labels) into one shard."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        pieces, order = [], [0] * len(indices)
        offset = 0
        for (shard, group), wanted in self._by_row_group(indices).items():
            table = self._read_row_group(shard, group, None)
            pieces.append(table.take([local for _, local in wanted]))
            for taken, (position, _) in enumerate(wanted):
                order[position] = offset + taken
            offset += len(wanted)
        try:  # shards may differ in their extra columns; missing ones become nulls
            table = pa.concat_tables(pieces, promote_options="default").take(order)
        except pa.ArrowInvalid as error:
            raise PreferenceDataError(
                f"cannot put the selected rows of {self.location} in one file: the shards' columns "
                f"disagree ({error}); give every shard the same column types (nothing was written)"
            ) from error
        with outputs.replacing(output) as temporary:
            pq.write_table(table, temporary, row_group_size=256)


def write_pickapic(rows: Iterable[dict], path: str | Path, *, row_group_size: int = 256) -> Path:
    """Write ``rows`` (dicts with caption, jpg_0 and jpg_1 bytes, label_0, label_1, and any extra
    columns) as one Pick-a-Pic v2 parquet shard at ``path``, atomically; returns ``path``.

    Rows are streamed in row groups of ``row_group_size`` (small, so a lazy reader fetching one
    pair reads few images). Labels are checked as the reader checks them, so a shard this writes
    always opens. The extra columns are those of the first row; their types are inferred from
    the first row group. An existing ``path`` is replaced (this builds data, e.g. a world's
    cached set); parent folders are created.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path).expanduser()
    if row_group_size < 1:
        raise ValueError(f"row_group_size must be at least 1, not {row_group_size}")
    required = pa.schema(
        [("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary())]
        + [("label_0", pa.float64()), ("label_1", pa.float64())]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with outputs.replacing(path) as temporary:
        writer, schema, columns, count = None, None, None, 0
        try:
            for batch in _batches(rows, row_group_size):
                for number, row in enumerate(batch, start=count):
                    columns = columns or list(row)
                    _check_row(row, number, columns)
                if schema is None:
                    extras = [name for name in columns if name not in PICKAPIC_COLUMNS]
                    inferred = pa.Table.from_pylist([{k: r.get(k) for k in extras} for r in batch]).schema
                    schema = pa.schema(list(required) + [inferred.field(name) for name in extras])
                    writer = pq.ParquetWriter(temporary, schema)
                try:
                    table = pa.Table.from_pylist(batch, schema=schema)
                except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
                    raise PreferenceDataError(
                        f"{path.name} rows {count}..{count + len(batch) - 1}: a value does not fit its column's "
                        f"type ({error}); the types come from the first {row_group_size} rows"
                    ) from error
                writer.write_table(table, row_group_size=row_group_size)
                count += len(batch)
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise PreferenceDataError(
                f"no rows to write to {path}; a Pick-a-Pic shard needs at least one pair"
            )
    return path


def _batches(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_row(row: dict, number: int, columns: list[str]) -> None:
    """A row ``write_pickapic`` may write: the Pick-a-Pic columns, known extras, labels the reader takes."""
    missing = [name for name in PICKAPIC_COLUMNS if name not in row]
    unknown = [name for name in row if name not in columns]
    if missing or unknown:
        raise PreferenceDataError(
            f"row {number}: "
            + (f"missing {', '.join(missing)}" if missing else f"columns {', '.join(unknown)} not in row 0")
            + f"; every row needs {', '.join(PICKAPIC_COLUMNS)} and the same extra columns as row 0"
        )
    labels = (row["label_0"], row["label_1"])
    if any(label not in _LABELS for label in labels) or sum(labels) != 1:
        raise PreferenceDataError(
            f"row {number}: labels {labels}; expected (1, 0), (0, 1) or (0.5, 0.5) (a tie, which readers drop)"
        )


# --- JSONL --------------------------------------------------------------------------------------

_JSONL_KEYS = ("prompt", "chosen", "rejected")


class JsonlData:
    """A JSONL file of ``{"prompt", "chosen", "rejected"}`` lines, parsed and checked on open (the
    text is small; the images are not, so they are decoded only when fetched)."""

    format = "jsonl"

    def __init__(self, location: Path):
        self.location = location
        self.stats = ReadStats()
        self._records: list[dict] = []  # each line's object as written, for write_subset
        self._lines: list[int] = []
        self._images: list[tuple[Path, Path]] = []  # (chosen, rejected), resolved
        try:
            text = location.read_text("utf-8")
        except UnicodeDecodeError as error:
            raise PreferenceDataError(
                f"{location}: not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8"
            ) from error
        folder = location.parent
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{location.name} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise PreferenceDataError(
                    f"{where}: not valid JSON ({error.msg} at column {error.colno}); expected one object per "
                    'line: {"prompt": "...", "chosen": "a.png", "rejected": "b.png"}'
                ) from error
            if not isinstance(record, dict):
                raise PreferenceDataError(f"{where}: a JSON {type(record).__name__}, expected an object")
            missing = [key for key in _JSONL_KEYS if key not in record]
            if missing:
                raise PreferenceDataError(
                    f"{where}: missing key(s) {', '.join(missing)}; each line needs prompt, chosen (the "
                    f"preferred image's path) and rejected (it has {', '.join(record) or 'no keys'})"
                )
            wrong = [key for key in _JSONL_KEYS if not isinstance(record[key], str) or not record[key]]
            if wrong:
                raise PreferenceDataError(
                    f"{where}: {', '.join(wrong)} must be non-empty text (a prompt, image paths)"
                )
            images = []
            for key in ("chosen", "rejected"):
                image = folder / Path(record[key]).expanduser()  # an absolute path stays as it is
                if not image.is_file():
                    raise PreferenceDataError(
                        f"{where}: {key} image {record[key]!r} is not a file (looked for {image}); paths are "
                        f"relative to the JSONL file's folder ({folder}) or absolute"
                    )
                images.append(image)
            self._records.append(record)
            self._lines.append(number)
            self._images.append((images[0], images[1]))
            self.stats.rows += 1
        if not self._records:
            raise PreferenceDataError(f"{location}: no pairs (the file has no non-blank lines)")
        self.stats.kept = len(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"JsonlData({str(self.location)!r}, {len(self)} pairs)"

    def prompts(self) -> list[str]:
        return [record["prompt"] for record in self._records]

    def pairs(self, indices: Sequence[int]) -> list[PreferencePair]:
        found = []
        for index in indices:
            index = _check_index(index, len(self))
            record, (chosen, rejected) = self._records[index], self._images[index]
            where = f"{self.location.name} line {self._lines[index]}"
            extra = {key: value for key, value in record.items() if key not in _JSONL_KEYS}
            found.append(
                PreferencePair(
                    record["prompt"],
                    _decode(chosen, where, f"chosen image {str(chosen)!r}"),
                    _decode(rejected, where, f"rejected image {str(rejected)!r}"),
                    where,
                    extra,
                )
            )
        return found

    def _write_subset(self, indices: Sequence[int], output: Path) -> None:
        """The lines at ``indices``, image paths rewritten to resolve from ``output``'s folder:
        relative when the image lies under that folder (the pair moves with it), else absolute."""
        folder = output.parent.resolve()
        lines = []
        for index in indices:
            record = dict(self._records[_check_index(index, len(self))])
            for key, image in zip(("chosen", "rejected"), self._images[index], strict=True):
                image = image.resolve()
                record[key] = str(image.relative_to(folder)) if image.is_relative_to(folder) else str(image)
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        outputs.write_text(output, "".join(lines))


# --- opening and writing -------------------------------------------------------------------------


def open_preferences(spec: str | Path, *, model: str | None = None) -> PreferenceData:
    """The preference data named by ``spec``: a registered name, a ``.jsonl`` file, a ``.parquet``
    file or a folder of parquet shards. Raises ``PreferenceDataError`` naming the shard and row (or
    line) for a missing column, an undecodable image, a label outside {0, 0.5, 1}, and an empty
    data set after dropping ties.

    With ``model``, a registered set written for other models (``entry.fits(model)``) is refused:
    its prompts mean nothing to a model that has never seen its world.
    """
    entry = registry.PREFERENCE_SETS.get(spec) if isinstance(spec, str) else None
    if entry is not None:
        if model is not None and not entry.fits(model):
            raise PreferenceDataError(
                f"preference set {entry.name!r} holds {entry.world or 'its own world'}'s prompts (for models "
                f"{', '.join(entry.models or ())}) but model is {model!r}; use it with one of those models, "
                "or give your own data: a .jsonl file or Pick-a-Pic parquet shards"
            )
        path = Path(entry.path(rebuild=False))
    else:
        path = Path(spec).expanduser()
    if not path.exists():
        names = registry.PREFERENCE_SETS.names()
        raise PreferenceDataError(
            f"no preference data {str(spec)!r}: not a registered set and not a file or folder."
            f"{registry.suggestion(str(spec), names)} Registered sets: {', '.join(names) or 'none'}; or give "
            "a .jsonl file, a .parquet file or a folder of Pick-a-Pic .parquet shards."
        )
    if path.is_dir():
        # Hidden names are skipped: diffalign's own half-written temporaries start with a dot.
        shards = sorted(p for p in path.glob("*.parquet") if p.is_file() and not p.name.startswith("."))
        if not shards:
            raise PreferenceDataError(
                f"{path}: a folder with no .parquet files; give a folder of Pick-a-Pic parquet shards, or the "
                ".jsonl or .parquet file itself"
            )
        return PickapicData(path, shards)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return PickapicData(path, [path])
    if suffix == ".jsonl":
        return JsonlData(path)
    raise PreferenceDataError(
        f"{path}: cannot tell its format from the suffix {suffix or '(none)'!r}; preference data is a .jsonl "
        "file, a .parquet file or a folder of .parquet shards"
    )


def write_subset(data: PreferenceData, indices: Sequence[int], output: str | Path) -> Path:
    """Write the pairs at ``indices`` of ``data`` to ``output`` in ``data``'s own format (parquet rows
    copied as they are; JSONL lines with their image paths still valid from the new location).
    Refuses to overwrite an existing file; writes atomically.

    The output holds the pairs in ``indices`` order. Parquet rows keep every column and their
    original labels (the winner is not moved to ``jpg_0``), so the subset is the original data
    set, filtered; ``output`` must end in ``.parquet`` or ``.jsonl`` to match ``data``.
    """
    indices = list(indices)
    writers = {"pickapic": (".parquet", PickapicData), "jsonl": (".jsonl", JsonlData)}
    if data.format not in writers or not isinstance(data, writers[data.format][1]):
        raise PreferenceDataError(
            f"write_subset writes data opened by open_preferences (Pick-a-Pic parquet or JSONL), not "
            f"{type(data).__name__}"
        )
    suffix, _ = writers[data.format]
    if not indices:
        raise PreferenceDataError(f"no pairs selected to write to {output}; an empty data set would not open")
    for index in indices:
        _check_index(index, len(data))
    output = _new_output(output, suffix, f"{data.format} data")
    data._write_subset(indices, output)  # type: ignore[union-attr]  # checked above
    return output
