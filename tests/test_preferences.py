"""Preference data readers and writers on small real files: Pick-a-Pic parquet shards and JSONL."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffalign import registry
from diffalign.preferences import (
    PickapicData,
    PreferenceDataError,
    encode_png,
    open_preferences,
    write_pickapic,
    write_subset,
)

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}


def png(colour: str) -> bytes:
    return encode_png(Image.new("RGB", (8, 8), COLOURS[colour]))


def colour_of(image: Image.Image) -> str:
    pixels = np.asarray(image)
    assert image.mode == "RGB" and (pixels == pixels[0, 0]).all()
    return next(name for name, rgb in COLOURS.items() if tuple(pixels[0, 0]) == rgb)


def row(caption: str, first: str, second: str, label_0: float, **extra) -> dict:
    return {
        "caption": caption,
        "jpg_0": png(first),
        "jpg_1": png(second),
        "label_0": label_0,
        "label_1": 1 - label_0,
        **extra,
    }


@pytest.fixture()
def shard(tmp_path):
    """Three rows: image 0 wins, a tie, image 1 wins; with per-image and per-row extra columns."""
    rows = [
        row("a red square", "red", "blue", 1.0, oracle_0=0.9, oracle_1=0.1, prompt_kind="colour"),
        row("a tie", "white", "black", 0.5, oracle_0=0.5, oracle_1=0.5, prompt_kind="tie"),
        row("a green square", "red", "green", 0.0, oracle_0=0.2, oracle_1=0.8, prompt_kind="colour"),
    ]
    return write_pickapic(rows, tmp_path / "shard-000.parquet")


def test_pickapic_puts_the_winner_first_drops_ties_and_passes_extras(shard):
    data = open_preferences(shard)
    assert data.format == "pickapic" and data.location == shard
    assert len(data) == 2
    assert (data.stats.rows, data.stats.ties, data.stats.kept) == (3, 1, 2)
    assert data.prompts() == ["a red square", "a green square"]
    second, first, again = data.pairs([1, 0, 1])  # any order, repeats allowed
    assert (colour_of(first.chosen), colour_of(first.rejected)) == ("red", "blue")
    assert (colour_of(second.chosen), colour_of(second.rejected)) == ("green", "red")
    assert second.prompt == "a green square" and colour_of(again.chosen) == "green"
    assert second.source == "shard-000.parquet row 2" and first.source == "shard-000.parquet row 0"
    assert second.extra == {"oracle_0": 0.2, "oracle_1": 0.8, "prompt_kind": "colour", "chosen_side": 1}
    assert first.extra["chosen_side"] == 0
    with pytest.raises(IndexError, match="2 pairs"):
        data.pairs([2])


def test_pickapic_reads_png_and_jpeg_alike(tmp_path):
    jpeg = Image.new("RGB", (8, 8), (0, 0, 255))
    buffer = io.BytesIO()
    jpeg.save(buffer, format="JPEG", quality=95)
    path = write_pickapic(
        [{**row("jpeg", "red", "red", 0.0), "jpg_1": buffer.getvalue()}], tmp_path / "j.parquet"
    )
    (pair,) = open_preferences(path).pairs([0])
    assert np.abs(np.asarray(pair.chosen).astype(int) - (0, 0, 255)).max() < 8  # JPEG is lossy
    assert colour_of(pair.rejected) == "red"


def test_pickapic_bad_label_names_shard_and_row(tmp_path):
    rows = [row("fine", "red", "blue", 1.0), row("bad", "red", "blue", 1.0)]
    rows[1]["label_0"], rows[1]["label_1"] = 0.7, 0.3
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(PreferenceDataError, match=r"bad\.parquet row 1: labels label_0=0\.7"):
        open_preferences(tmp_path / "bad.parquet")
    rows[1]["label_0"], rows[1]["label_1"] = 1.0, 1.0  # both in {0, 0.5, 1}, but not summing to 1
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "both.parquet")
    with pytest.raises(PreferenceDataError, match=r"both\.parquet row 1"):
        open_preferences(tmp_path / "both.parquet")


def test_pickapic_undecodable_image_fails_at_fetch_naming_column_shard_and_row(tmp_path):
    rows = [row("fine", "red", "blue", 1.0), {**row("broken", "red", "blue", 0.0), "jpg_1": b"not an image"}]
    data = open_preferences(write_pickapic(rows, tmp_path / "shard-007.parquet"))  # opening decodes nothing
    assert colour_of(data.pairs([0])[0].chosen) == "red"
    with pytest.raises(
        PreferenceDataError, match=r"shard-007\.parquet row 1: column jpg_1 is not a readable"
    ):
        data.pairs([1])


def test_pickapic_missing_columns_are_named_with_what_is_there(tmp_path):
    table = pa.Table.from_pylist([row("x", "red", "blue", 1.0)]).drop_columns(["label_1", "jpg_0"])
    pq.write_table(table, tmp_path / "cols.parquet")
    with pytest.raises(
        PreferenceDataError, match=r"cols\.parquet: missing column\(s\) jpg_0, label_1;"
    ) as error:
        open_preferences(tmp_path / "cols.parquet")
    assert "this one has caption, jpg_1, label_0" in str(error.value)


def test_pickapic_all_ties_is_an_error(tmp_path):
    rows = [row(f"tie {i}", "red", "blue", 0.5) for i in range(3)]
    with pytest.raises(PreferenceDataError, match="all 3 rows were ties"):
        open_preferences(write_pickapic(rows, tmp_path / "ties.parquet"))


def test_pickapic_folder_numbers_pairs_across_shards_in_name_order(tmp_path):
    folder = tmp_path / "prefs"
    # Written out of name order; read in name order.
    write_pickapic(
        [row("b0", "green", "red", 1.0), row("b-tie", "red", "red", 0.5)], folder / "shard-001.parquet"
    )
    write_pickapic(
        [row("a0", "red", "blue", 1.0), row("a1", "black", "white", 0.0)], folder / "shard-000.parquet"
    )
    (folder / "notes.txt").write_text("not a shard")
    (folder / ".diffalign-tmp-half.parquet").write_bytes(b"half-written")  # a temporary is not a shard
    data = open_preferences(folder)
    assert data.location == folder and data.prompts() == ["a0", "a1", "b0"]
    assert (data.stats.rows, data.stats.ties, data.stats.kept) == (4, 1, 3)
    pairs = data.pairs([2, 1])
    assert [pair.source for pair in pairs] == ["shard-001.parquet row 0", "shard-000.parquet row 1"]
    assert [colour_of(pair.chosen) for pair in pairs] == ["green", "white"]


def test_missing_paths_and_empty_folders_are_errors(tmp_path):
    with pytest.raises(PreferenceDataError, match="not a registered set and not a file or folder"):
        open_preferences(tmp_path / "nowhere.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreferenceDataError, match="a folder with no .parquet files"):
        open_preferences(tmp_path / "empty")
    (tmp_path / "prefs.csv").write_text("caption\n")
    with pytest.raises(PreferenceDataError, match="cannot tell its format"):
        open_preferences(tmp_path / "prefs.csv")


def test_fetching_a_pair_reads_only_its_row_group(tmp_path, monkeypatch):
    colours = ["red", "green", "blue", "white", "black"]
    rows = [row(f"p{i}", colours[i % 5], colours[(i + 1) % 5], 1.0) for i in range(20)]
    path = write_pickapic(rows, tmp_path / "groups.parquet", row_group_size=4)
    assert pq.ParquetFile(path).num_row_groups == 5
    reads = []
    read = PickapicData._read_row_group

    def counting(self, shard, group, columns):
        reads.append((shard, group, None if columns is None else tuple(columns)))
        return read(self, shard, group, columns)

    monkeypatch.setattr(PickapicData, "_read_row_group", counting)  # a wrapper: the real read still runs
    data = open_preferences(path)
    assert reads == []  # the index is built from the caption and label columns, not by row group
    (pair,) = data.pairs([9])
    assert reads == [(0, 2, ("jpg_0", "jpg_1"))]  # rows 8..11: one group, no caption or label column
    assert pair.prompt == "p9" and colour_of(pair.chosen) == colours[9 % 5]
    reads.clear()
    data.pairs([1, 10, 2, 9])
    assert sorted(reads) == [(0, 0, ("jpg_0", "jpg_1")), (0, 2, ("jpg_0", "jpg_1"))]  # each group once


# --- JSONL ---------------------------------------------------------------------------------------


@pytest.fixture()
def jsonl(tmp_path):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for name in COLOURS:
        (images / f"{name}.png").write_bytes(png(name))
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(png("white"))
    lines = [
        json.dumps({"prompt": "red over blue", "chosen": "images/red.png", "rejected": "images/blue.png"}),
        "",
        json.dumps({"prompt": "white", "chosen": str(elsewhere), "rejected": "images/black.png", "score": 3}),
        json.dumps({"prompt": "green", "chosen": "images/green.png", "rejected": "images/red.png"}),
    ]
    path = tmp_path / "data" / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_reads_relative_and_absolute_paths_and_extras(jsonl):
    data = open_preferences(jsonl)
    assert data.format == "jsonl" and len(data) == 3 and data.stats.rows == 3 and data.stats.ties == 0
    assert data.prompts() == ["red over blue", "white", "green"]
    first, second = data.pairs([0, 1])
    assert (colour_of(first.chosen), colour_of(first.rejected)) == ("red", "blue")
    assert (colour_of(second.chosen), colour_of(second.rejected)) == ("white", "black")
    assert second.source == "pairs.jsonl line 3" and second.extra == {"score": 3} and first.extra == {}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "x", "chosen": "a.png"', r"pairs\.jsonl line 2: not valid JSON"),
        ('{"prompt": "x", "chosen": "a.png"}', r"pairs\.jsonl line 2: missing key\(s\) rejected"),
        (
            '{"prompt": "x", "chosen": "a.png", "rejected": "gone.png"}',
            r"line 2: rejected image 'gone\.png' is not a file",
        ),
        ('["x", "a.png", "a.png"]', r"line 2: a JSON list, expected an object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    (tmp_path / "a.png").write_bytes(png("red"))
    good = json.dumps({"prompt": "fine", "chosen": "a.png", "rejected": "a.png"})
    (tmp_path / "pairs.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(PreferenceDataError, match=message):
        open_preferences(tmp_path / "pairs.jsonl")


def test_jsonl_undecodable_image_fails_at_fetch(tmp_path):
    (tmp_path / "a.png").write_bytes(png("red"))
    (tmp_path / "junk.png").write_bytes(b"\x89PNG but not really")
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"prompt": "x", "chosen": "a.png", "rejected": "junk.png"})
    )
    data = open_preferences(tmp_path / "pairs.jsonl")
    with pytest.raises(
        PreferenceDataError, match=r"pairs\.jsonl line 1: rejected image .*junk\.png' is not a readable"
    ):
        data.pairs([0])
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(PreferenceDataError, match="no pairs"):
        open_preferences(tmp_path / "blank.jsonl")


# --- writing -------------------------------------------------------------------------------------


def test_write_subset_parquet_copies_the_rows_verbatim_in_index_order(tmp_path):
    folder = tmp_path / "prefs"
    write_pickapic(
        [row("a0", "red", "blue", 1.0, kind="x"), row("tie", "red", "red", 0.5, kind="t")],
        folder / "s0.parquet",
    )
    write_pickapic(
        [row("b0", "red", "green", 0.0, kind="y"), row("b1", "white", "black", 1.0, kind="z")],
        folder / "s1.parquet",
    )
    data = open_preferences(folder)
    output = write_subset(data, [2, 0, 1], tmp_path / "out" / "subset.parquet")
    stored = pq.read_table(output).to_pylist()
    assert [r["caption"] for r in stored] == ["b1", "a0", "b0"]
    assert [(r["label_0"], r["label_1"], r["kind"]) for r in stored] == [
        (1.0, 0.0, "z"),
        (1.0, 0.0, "x"),
        (0.0, 1.0, "y"),
    ]
    assert stored[2]["jpg_0"] == png("red") and stored[2]["jpg_1"] == png("green")  # not reordered
    subset = open_preferences(output)
    assert subset.prompts() == ["b1", "a0", "b0"]
    originals, copies = data.pairs([2, 0, 1]), subset.pairs([0, 1, 2])
    for original, copy in zip(originals, copies, strict=True):
        assert np.array_equal(np.asarray(original.chosen), np.asarray(copy.chosen))
        assert np.array_equal(np.asarray(original.rejected), np.asarray(copy.rejected))
        assert original.extra == copy.extra
    before = output.read_bytes()
    with pytest.raises(PreferenceDataError, match="already exists.*nothing was written"):
        write_subset(data, [0], output)
    assert output.read_bytes() == before
    with pytest.raises(PreferenceDataError, match=r"ending in \.parquet"):
        write_subset(data, [0], tmp_path / "subset.jsonl")
    assert sorted(p.name for p in output.parent.iterdir()) == ["subset.parquet"]  # no temporaries left


def test_write_subset_jsonl_keeps_image_paths_valid_from_the_new_folder(jsonl, tmp_path):
    data = open_preferences(jsonl)
    output = write_subset(data, [2, 1], tmp_path / "elsewhere" / "deeper" / "subset.jsonl")
    subset = open_preferences(output)
    assert subset.prompts() == ["green", "white"]
    for original, copy in zip(data.pairs([2, 1]), subset.pairs([0, 1]), strict=True):
        assert colour_of(copy.chosen) == colour_of(original.chosen)
        assert colour_of(copy.rejected) == colour_of(original.rejected)
        assert copy.extra == original.extra
    inside = write_subset(data, [0], jsonl.parent / "subset.jsonl")  # images under the folder: relative
    assert json.loads(inside.read_text())["chosen"] == "images/red.png"
    with pytest.raises(PreferenceDataError, match="already exists"):
        write_subset(data, [0], output)


def test_write_pickapic_checks_rows_and_streams_row_groups(tmp_path):
    with pytest.raises(PreferenceDataError, match=r"row 1: labels \(1\.0, 1\.0\)"):
        write_pickapic(
            [row("a", "red", "blue", 1.0), {**row("b", "red", "blue", 1.0), "label_1": 1.0}],
            tmp_path / "x.parquet",
        )
    with pytest.raises(PreferenceDataError, match="row 0: missing jpg_1"):
        write_pickapic(
            [{k: v for k, v in row("a", "red", "blue", 1.0).items() if k != "jpg_1"}], tmp_path / "x.parquet"
        )
    with pytest.raises(PreferenceDataError, match="no rows"):
        write_pickapic([], tmp_path / "x.parquet")
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
    rows = (row(f"p{i}", "red", "blue", float(i % 2), step=i) for i in range(10))  # any iterable
    path = write_pickapic(rows, tmp_path / "deep" / "x.parquet", row_group_size=3)
    assert pq.ParquetFile(path).num_row_groups == 4
    assert pq.read_table(path).column_names == ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "step"]


# --- registered names ------------------------------------------------------------------------------


def test_registered_set_resolves_and_refuses_models_it_does_not_fit(shard, monkeypatch):
    monkeypatch.setattr(registry, "PREFERENCE_SETS", registry.Registry("preference set"))
    asked = []

    def where(rebuild: bool = False):
        asked.append(rebuild)
        return shard

    registry.register_preference_set("test-prefs", where, models=("shapes",), world="ShapesWorld")
    data = open_preferences("test-prefs", model="shapes")
    assert data.location == shard and len(data) == 2 and asked == [False]
    assert len(open_preferences("test-prefs")) == 2  # no model: no check
    with pytest.raises(
        PreferenceDataError, match="'test-prefs' holds ShapesWorld's prompts.*model is 'tiny-random'"
    ):
        open_preferences("test-prefs", model="tiny-random")
    with pytest.raises(PreferenceDataError, match="Did you mean 'test-prefs'"):
        open_preferences("test-pref")
