"""Prompt sources in the shapes people have them: every row read once, in order, with its
position; a file that cannot be a table is refused at once, naming what was found."""

import json

import pytest
import tables

from kinoray.pipelines.sources import InputError, PromptFile, _iter_rows, parse_row, resolve

ROWS = [
    {"id": "a", "prompt": "a fox", "seed": 1, "height": 32},
    {"id": "b", "prompt": "a boat", "negative_prompt": "blurry", "num_frames": 5},
    {"id": "c", "prompt": "a kite", "fps": 12},
]


def read_all(source, allowed=()):
    """(file name, row, parsed object or error) for every row of every file."""
    out = []
    for f in resolve(source, allowed):
        for row, raw, error in _iter_rows(f):
            if raw is not None:
                try:
                    error = parse_row(raw)
                except ValueError as exc:
                    error = str(exc)
            out.append((f.url.rsplit("/", 1)[-1], row, error))
    return out


def objects(source):
    return [obj for _, _, obj in read_all(source)]


def test_jsonl_with_bom_crlf_and_blank_lines(tmp_path):
    path = tables.jsonl(tmp_path / "p.jsonl", ROWS, bom=True, crlf=True, blank=True)
    assert objects(str(path)) == ROWS
    one = tables.jsonl(tmp_path / "one.jsonl", ROWS[:1], bom=True)
    assert objects(str(one)) == ROWS[:1]  # a one-row file with a byte-order mark keeps its row


@pytest.mark.parametrize("bom", [False, True])
def test_pandas_csv_ignores_its_index_column(tmp_path, bom):
    path = tables.pandas_csv(tmp_path / "p.csv", ROWS, bom=bom)
    got = objects(str(path))
    assert [r["id"] for r in got] == ["a", "b", "c"]
    assert got[0] == {"id": "a", "prompt": "a fox", "seed": "1.0", "height": "32.0"}  # pandas writes floats
    assert "negative_prompt" not in got[0]  # an empty cell is a missing value


def test_tsv(tmp_path):
    path = tables.pandas_csv(tmp_path / "p.tsv", ROWS, sep="\t")
    assert [r["prompt"] for r in objects(str(path))] == ["a fox", "a boat", "a kite"]


def test_parquet_written_by_pandas_after_a_sort(tmp_path):
    path = tables.pandas_parquet_sorted(tmp_path / "p.parquet", ROWS)
    got = read_all(str(path))
    assert [o["id"] for _, _, o in got] == ["c", "a", "b"]  # the file's row order (by prompt, descending)
    assert all("__index_level_0__" not in o for _, _, o in got)
    assert [row for _, row, _ in got] == [0, 1, 2]


def test_spark_folder_of_parts(tmp_path):
    folder = tables.spark_folder(tmp_path / "spark_out", ROWS)
    got = read_all(str(folder))
    assert sorted(o["id"] for _, _, o in got) == ["a", "b", "c"]
    assert {name for name, _, _ in got} == {
        "part-00000-6f1c2b9e-c000.snappy.parquet",
        "part-00001-6f1c2b9e-c000.snappy.parquet",
    }


def test_glob_and_list_of_sources(tmp_path):
    tables.jsonl(tmp_path / "a.jsonl", ROWS[:1])
    tables.jsonl(tmp_path / "b.jsonl", ROWS[1:])
    (tmp_path / "notes.txt").write_text("not a table")
    assert [o["id"] for o in objects(str(tmp_path / "*.jsonl"))] == ["a", "b", "c"]
    assert [o["id"] for o in objects([str(tmp_path / "b.jsonl"), str(tmp_path / "a.jsonl")])] == [
        "b",
        "c",
        "a",
    ]
    assert [o["id"] for o in objects(str(tmp_path))] == ["a", "b", "c"]  # a folder: tables only


@pytest.mark.parametrize("orient", ["records", "columns", "index", "split", "table"])
def test_json_as_pandas_writes_it(tmp_path, orient):
    path = tables.pandas_json(tmp_path / "p.json", ROWS, orient)
    got = objects(str(path))
    assert [r["id"] for r in got] == ["a", "b", "c"] and got[0]["prompt"] == "a fox"


def test_json_shapes_people_write(tmp_path):
    (tmp_path / "wrapped.json").write_text(json.dumps({"prompts": ROWS}))
    assert objects(str(tmp_path / "wrapped.json")) == ROWS
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert objects(str(tmp_path / "lines.json")) == ROWS
    (tmp_path / "mixed.json").write_text(json.dumps([ROWS[0], [1, 2]]))
    got = read_all(str(tmp_path / "mixed.json"))
    assert got[0][2] == ROWS[0] and "not a JSON object: a JSON list" in got[1][2]
    (tmp_path / "numbers.json").write_text("[[1, 2], [3, 4]]")
    with pytest.raises(InputError, match="found a JSON array of list"):
        resolve(str(tmp_path / "numbers.json"))


def test_json_of_another_shape_is_refused_naming_it(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"version": 2, "items": {"x": 1}}))
    with pytest.raises(InputError, match="found a JSON object with keys version, items"):
        resolve(str(tmp_path / "p.json"))


@pytest.mark.parametrize("kind", ["gz", "bz2", "xz", "zst"])
def test_compressed_jsonl(tmp_path, kind):
    path = tables.compressed(tmp_path / f"p.jsonl.{kind}", ROWS, kind)
    assert objects(str(path)) == ROWS


def test_bad_rows_are_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(
        b'{"prompt": "ok"}\nnot json\n[1, 2]\n{"prompt": "caf\xc3"}\n{"prompt": "a cat \\ud83d then text"}\n'
    )
    got = read_all(str(path))
    assert [row for _, row, _ in got] == [0, 1, 2, 3, 4]
    assert got[0][2] == {"prompt": "ok"}
    assert "not a JSON object" in got[1][2] and "not a JSON object: a JSON list" in got[2][2]
    assert "not valid UTF-8" in got[3][2]
    assert got[4][2]["prompt"] == "a cat \ud83d then text"  # read; the request check names it


def test_passthrough_columns_are_allowed_when_named(tmp_path):
    path = tables.jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "caption_id": 7}])
    with pytest.raises(InputError, match="unknown column.s. 'caption_id'"):
        resolve(str(path))
    assert resolve(str(path), ["caption_id"]) == [PromptFile(str(path), "jsonl")]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.jsonl", None, "no such file"),
        ("p.txt", "prompt\nhi\n", "unknown prompt table format"),
        ("p.csv", "text,seed\nhi,1\n", "no 'prompt' column"),
        ("p.jsonl", '{"text": "hi"}\n', "no 'prompt' column"),
        ("p.csv", "prompt,colour\nhi,red\n", "unknown column(s) 'colour'"),
        ("p.csv", "prompt, seed\nhi,1\n", "unknown column(s) ' seed'"),
        ("p.csv", "prompt,prompt\na,b\n", "column(s) 'prompt' appear more than once"),
        ("p.csv", "id;prompt;seed\na;hi;1\n", "separated by ';'"),
        ("p.csv", "prompt\n", "no rows"),
        ("p.jsonl", "", "no rows"),
        ("p.parquet", "this is not parquet", "cannot read as parquet"),
    ],
)
def test_bad_files_fail_at_once_with_a_clear_message(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(str(path))


def test_an_empty_folder_is_refused(tmp_path):
    (tmp_path / "_SUCCESS").write_text("")
    with pytest.raises(InputError, match="no prompt tables"):
        resolve(str(tmp_path))


def test_empty_parts_of_a_folder_hold_no_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tables.spark_folder(tmp_path / "parts", ROWS, parts=1)
    empty = pa.Table.from_pylist(ROWS).slice(0, 0)
    pq.write_table(empty, folder / "part-00001-6f1c2b9e-c000.snappy.parquet")
    (folder / "part-00002.json").write_text("")
    (folder / "part-00003.csv").write_text("prompt,seed\n")
    assert [name for name, _, _ in read_all(str(folder))] == ["part-00000-6f1c2b9e-c000.snappy.parquet"] * 3
    # A folder of empty parts only has no rows at all.
    (folder / "part-00000-6f1c2b9e-c000.snappy.parquet").unlink()
    with pytest.raises(InputError, match="no rows"):
        resolve(str(folder))


def test_a_table_in_another_format_or_encoding_than_its_name_says(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "fake.csv")
    with pytest.raises(InputError, match="is a Parquet file; name it .parquet"):
        resolve(str(tmp_path / "fake.csv"))
    (tmp_path / "excel.csv").write_bytes(
        "prompt\tseed\r\nhi\t1\r\n".encode("utf-16")
    )  # Excel's "Unicode text"
    with pytest.raises(InputError, match="is UTF-16 text .* save it as UTF-8"):
        resolve(str(tmp_path / "excel.csv"))


def test_a_file_whose_first_rows_are_all_broken_is_still_read_row_by_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("not json\n" * 150 + json.dumps({"prompt": "fine"}) + "\n")  # past the header peek
    got = read_all(str(path))
    assert len(got) == 151 and got[150][2] == {"prompt": "fine"}
