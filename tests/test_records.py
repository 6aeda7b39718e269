"""Every input rejection: one line naming file, line and field; exit 1; the store untouched."""
import json

import pytest

from cluster.cli import main
from conftest import synthetic_records, write_jsonl
from core.errors import UnlearnError
from core.sources import load_records

GOOD = [{"id": "a", "text": "fine film", "label": "pos"}, {"id": "b", "text": "bad film", "label": "neg"}]


def store_snapshot(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) if path.exists() else None


@pytest.fixture
def existing_store(tmp_path):
    """A store that already holds a run, so 'unchanged' is checked against real content."""
    store = tmp_path / "store"
    data = write_jsonl(tmp_path / "good.jsonl", synthetic_records(12))
    assert main(["train", "--data", data, "--run", "base", "--store", str(store), "--model", "tiny",
                 "--shards", "2", "--slices", "1", "--quiet"]) == 0
    return store


def jsonl_bytes(rows):
    return b"".join((json.dumps(r) if not isinstance(r, str) else r).encode() + b"\n" for r in rows)


CASES = {
    "missing field": (".jsonl", jsonl_bytes([GOOD[0], {"id": "b", "label": "neg"}]), ":2: missing field 'text'"),
    "empty field": (".jsonl", jsonl_bytes([GOOD[0], {"id": "b", "text": "  ", "label": "neg"}]), ":2: field 'text' is empty"),
    "empty label": (".jsonl", jsonl_bytes([{"id": "a", "text": "x", "label": ""}]), ":1: field 'label' is empty"),
    "duplicate id": (".jsonl", jsonl_bytes([GOOD[0], GOOD[1], {**GOOD[0], "text": "again"}]),
                     ":3: field 'id': duplicate id \"a\" (first at"),
    "non-utf8": (".jsonl", jsonl_bytes(GOOD) + b'{"id": "c", "text": "caf\xe9", "label": "pos"}\n',
                 ":3: not valid UTF-8 (byte 0xe9 at column 25)"),
    "malformed json": (".jsonl", jsonl_bytes([GOOD[0], '{"id": "b", "text": ']), ":2: malformed JSON"),
    "not an object": (".jsonl", jsonl_bytes([GOOD[0], "[1, 2]"]), ":2: expected a JSON object, got list"),
    "path separator": (".jsonl", jsonl_bytes([{**GOOD[0], "id": "a/b"}]),
                       ":1: field 'id' contains the path separator '/': \"a/b\" is unsafe as a storage key"),
    "backslash": (".jsonl", jsonl_bytes([{**GOOD[0], "id": "a\\b"}]), ":1: field 'id' contains the path separator"),
    "dotdot": (".jsonl", jsonl_bytes([{**GOOD[0], "id": "x..y"}]), ":1: field 'id' contains '..'"),
    "control char": (".jsonl", jsonl_bytes([{**GOOD[0], "id": "a\u0007b"}]),
                     ":1: field 'id' contains the control character U+0007: \"a\\u0007b\""),
    "csv missing column": (".csv", b"id,text\na,hello\n", ":1: missing column 'label' in the header"),
    "csv ragged row": (".csv", b"id,text,label\na,hello,pos\nb,bye\n", ":3: malformed CSV row: 2 fields, header has 3"),
    "csv empty field": (".csv", b"id,text,label\na,hello,pos\nb,,neg\n", ":3: field 'text' is empty"),
    "csv non-utf8": (".csv", b"id,text,label\na,hello,pos\nb,\xff\xfe,neg\n", ":3: not valid UTF-8 (byte 0xff at column 3)"),
    "unknown type": (".txt", b"hello\n", "unknown file type '.txt'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_rejected_with_one_line_and_store_unchanged(case, tmp_path, existing_store, capsys):
    ext, content, expected = CASES[case]
    path = tmp_path / f"bad{ext}"
    path.write_bytes(content)
    before = store_snapshot(existing_store)
    capsys.readouterr()
    code = main(["train", "--data", str(path), "--run", "new", "--store", str(existing_store), "--model", "tiny", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1, err
    assert err[0].startswith(f"unlearn: error: {path}") or expected.startswith("unknown")
    assert expected in err[0]
    assert store_snapshot(existing_store) == before


def test_parquet_rows_are_named(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is needed for Parquet input")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", ""], "label": ["p", "n"]}), tmp_path / "d.parquet")
    with pytest.raises(UnlearnError, match=r"d.parquet: row 2: field 'text' is empty"):
        load_records(str(tmp_path / "d.parquet"))
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"], "label": ["p", "n"], "owner": ["u", "u"]}),
                   tmp_path / "ok.parquet")
    recs = load_records(str(tmp_path / "ok.parquet"))
    assert [r.owner for r in recs] == ["u", "u"]


def test_owner_defaults_to_id_and_ints_are_accepted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 7, "text": "t", "label": 1}, {"id": "x", "text": "u", "label": 0, "owner": "o"}])
    recs = load_records(path)
    assert [(r.id, r.label, r.owner) for r in recs] == [("7", "1", "7"), ("x", "0", "o")]


def test_csv_with_quoted_newlines(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('id,text,label,owner\na,"two\nlines",pos,u1\nb,plain,neg,\n')
    with pytest.raises(UnlearnError, match=r"d.csv:4: field 'owner' is empty"):
        load_records(str(path))


def test_rotten_tomatoes_dataset_splits_by_owner():
    train = load_records("dataset:rotten_tomatoes?split=train&limit=300")
    test = load_records("dataset:rotten_tomatoes?split=test&limit=100")
    assert len(train) == 300 and len(test) == 100
    assert {r.label for r in train} == {"fresh", "rotten"}
    assert not ({r.owner for r in train} & {r.owner for r in test})
    with pytest.raises(UnlearnError, match="option 'limit' must be a positive integer"):
        load_records("dataset:rotten_tomatoes?limit=zero")
    with pytest.raises(UnlearnError, match="unknown data set 'nope'"):
        load_records("dataset:nope")
