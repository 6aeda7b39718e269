"""Hostile data files and option values: one line naming the file:line and field (or the
option), a non-zero exit, nothing written; never a traceback or a hang."""
import json

import pytest

from cluster.cli import main
from conftest import synthetic_records, write_jsonl
from core.errors import UnlearnError
from core.records import quote
from core.sources import load_records, load_texts
from core.store import LocalStore, open_store

GOOD = [{"id": "a", "text": "fine film", "label": "pos"}, {"id": "b", "text": "bad film", "label": "neg"}]
SURROGATE = "\ud800"


def lines(*rows) -> bytes:
    return b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in rows)


def listing(path):
    return sorted((p.relative_to(path).as_posix(), p.stat().st_size) for p in path.rglob("*")) if path.exists() else []


@pytest.fixture
def trained(tmp_path):
    """A store with something in it (no run is needed: every check here comes before the
    run is read), and a data file."""
    store = tmp_path / "store"
    (store / "base").mkdir(parents=True)
    (store / "base" / "HEAD").write_text('{"manifest": "base/manifests/x.json"}')
    return store, write_jsonl(tmp_path / "d.jsonl", synthetic_records(12))


def cli(argv, capsys):
    """(exit status, stderr lines) of `unlearn ARGV`, usage errors included."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


# -- data files ------------------------------------------------------------------------------

HUGE_ID = '{"id": ' + "7" * 5000 + ', "text": "t", "label": "p"}'
DEEP = '{"id": "a", "text": "t", "label": "p", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"

FILE_CASES = {  # name: (file content, what the one line says after "FILE:")
    "5000-digit integer id": (lines(GOOD[0], HUGE_ID),
                              "2: field 'id' is an integer of 5000 digits; integers may have at most 20 digits"),
    "nested 100,000 deep": (lines(GOOD[0], DEEP), "2: JSON nested too deeply"),
    "lone surrogate in a text": (lines(GOOD[0], '{"id": "b", "text": "x\\ud800y", "label": "n"}'),
                                 "2: field 'text' contains a lone surrogate U+D800"),
    "lone surrogate in an id": (lines('{"id": "a\\udc00", "text": "x", "label": "n"}', GOOD[1]),
                                "1: field 'id' contains a lone surrogate U+DC00"),
    "duplicate key": (lines(GOOD[0], '{"id": "b", "text": "x", "label": "pos", "label": "neg"}'),
                      '2: duplicate key "label" in a JSON object'),
    "duplicate key, nested": (lines('{"id": "a", "text": "x", "label": "p", "m": {"k": 1, "k": 2}}'),
                              '1: duplicate key "k" in a JSON object'),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_hostile_jsonl_is_one_line_naming_file_line_and_field(case, tmp_path):
    content, expected = FILE_CASES[case]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    for load in (load_records, load_texts):
        if load is load_texts and "'id'" in expected:
            assert load(str(path))  # predict inputs need only a text: the id is not read
            continue
        with pytest.raises(UnlearnError) as err:
            load(str(path))
        assert str(err.value).startswith(f"{path}:{expected}")


def test_integer_ids_up_to_20_digits_are_accepted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 18446744073709551615, "text": "t", "label": 1},
                                               {"id": -7, "text": "u", "label": 0}])
    assert [r.id for r in load_records(path)] == ["18446744073709551615", "-7"]
    path = write_jsonl(tmp_path / "e.jsonl", [{"id": 10**20, "text": "t", "label": 1}])
    with pytest.raises(UnlearnError, match="e.jsonl:1: field 'id' is an integer of 21 digits"):
        load_records(path)


def test_a_csv_starting_with_a_bom_is_read(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbfid,text,label\na,fine,pos\nb,bad,neg\n")
    assert [(r.id, r.text) for r in load_records(str(path))] == [("a", "fine"), ("b", "bad")]
    texts = tmp_path / "t.csv"
    texts.write_bytes(b"\xef\xbb\xbftext\nfine\n")
    assert load_texts(str(texts)) == ["fine"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + lines(*GOOD))
    assert [r.id for r in load_records(str(jsonl))] == ["a", "b"]


def test_a_bom_does_not_shift_the_reported_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbfid,te\xffxt,label\n")
    with pytest.raises(UnlearnError, match=r"d.csv:1: not valid UTF-8 \(byte 0xff at column 9\)"):
        load_records(str(path))


def test_invalid_utf8_in_a_parquet_string_names_row_and_field(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    offsets = pa.py_buffer(b"\x00\x00\x00\x00\x01\x00\x00\x00\x03\x00\x00\x00")
    ids = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"ab\xff")])
    pq.write_table(pa.table({"id": ids, "text": ["x", "y"], "label": ["p", "n"]}), tmp_path / "d.parquet")
    with pytest.raises(UnlearnError, match=r"d.parquet: row 2: field 'id' is not valid UTF-8 \(byte 0xff"):
        load_records(str(tmp_path / "d.parquet"))


def test_a_hostile_training_file_through_the_cli_leaves_the_store_as_it_was(trained, tmp_path, capsys):
    store, _ = trained
    before = listing(store)
    for name, (content, expected) in FILE_CASES.items():
        path = tmp_path / "bad.jsonl"
        path.write_bytes(content)
        code, err = cli(["train", "--data", str(path), "--run", "new", "--store", str(store), "--model", "tiny"], capsys)
        assert (code, len(err)) == (1, 1), (name, err)
        assert err[0].startswith(f"unlearn: error: {path}:{expected}"), (name, err)
    assert listing(store) == before


def test_quoted_values_in_messages_are_cut_to_one_readable_line():
    assert quote("x" * 100_000) == json.dumps("x" * 100) + "... (100000 characters)"
    assert quote("a\u0007b") == '"a\\u0007b"'


# -- store URIs ----------------------------------------------------------------------------------

def test_file_uris_open_the_local_backend(tmp_path):
    store = open_store(f"file://{tmp_path}/a%20b")
    assert isinstance(store, LocalStore) and store.root == str(tmp_path / "a b")
    assert open_store(f"file://localhost{tmp_path}").root == str(tmp_path)
    assert open_store(f"file:{tmp_path}").root == str(tmp_path)
    for bad, message in ((f"file://host{tmp_path}", "host 'host' is not this machine"),
                         ("file://", "expected file:///absolute/path"),
                         (f"file://{tmp_path}?x=1", "expected file:///absolute/path"),
                         ("http://x/y", "unsupported scheme")):
        with pytest.raises(UnlearnError, match=message):
            open_store(bad)


def test_a_file_uri_store_works_through_the_cli(trained, capsys):
    store, _ = trained
    code, err = cli(["status", "--run", "other", "--store", f"file://{store}"], capsys)
    assert (code, err) == (1, [f'unlearn: error: run "other" not found in store {store}'])
    code, err = cli(["status", "--run", "base", "--store", f"file://elsewhere{store}"], capsys)
    assert code == 1 and len(err) == 1 and "not this machine" in err[0]
