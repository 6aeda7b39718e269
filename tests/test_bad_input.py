"""Hostile data files and option values: one line naming the file:line and field (or the
option), a non-zero exit, nothing written; never a traceback or a hang."""
import argparse
import json
import math
import os

import pytest

from conftest import synthetic_records, write_jsonl
from proc_helpers import cli_in_process
from core.errors import UnlearnError
from core.records import quote
from core.sources import load_records, load_texts
from core.store import LocalStore, open_store

try:
    from cluster import options as opt
except ImportError:  # so that this file runs, and fails test by test, against older code
    opt = None

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
    code, _out, err = cli_in_process(argv, capsys)
    return code, err


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


# -- delete's ids and owners -------------------------------------------------------------------

@pytest.mark.parametrize("option,value,message", [
    ("--ids", "r0001\udcff", '--ids: "r0001\\udcff" contains a lone surrogate U+DCFF'),
    ("--owners", "o" + SURROGATE, '--owners: "o\\ud800" contains a lone surrogate U+D800'),
    ("--ids", "x" * 100_000, "(100000 characters) is longer than 256 characters"),
    ("--ids", "a/b", '--ids: "a/b" contains the path separator'),
])
def test_hostile_delete_targets_are_one_line_and_accept_nothing(trained, capsys, option, value, message):
    store, _ = trained
    before = listing(store)
    code, err = cli(["delete", "--run", "base", "--store", str(store), option, value, "--quiet"], capsys)
    assert code == 1 and len(err) == 1 and message in err[0], err
    assert listing(store) == before


def test_hostile_ids_and_owners_files_are_one_line(tmp_path):
    from core.sources import read_lines

    path = tmp_path / "ids.txt"
    path.write_bytes(b"\xef\xbb\xbfr0001\n\n  r0002 \n" + ("y" * 300).encode() + b"\n")
    ids = read_lines(str(path))
    assert ids[:2] == ["r0001", "r0002"]
    args = argparse.Namespace(ids=None, ids_file=str(path), owners=None, owners_file=None)
    with pytest.raises(UnlearnError, match=r'^--ids-file: "y{100}"\.\.\. \(300 characters\) is longer than 256'):
        opt.check_targets(args, ids, [])
    args = argparse.Namespace(ids=None, ids_file=None, owners=None, owners_file=str(path))
    with pytest.raises(UnlearnError, match=r'^--owners-file: "a,b" contains a comma'):
        opt.check_targets(args, [], ["a,b"])
    opt.check_targets(args, [], ["y" * 300])  # owners have no length limit in the data either


# -- option values -----------------------------------------------------------------------------

def usage_error(argv, capsys, option: str) -> str:
    code, err = cli(argv, capsys)
    assert code == 2 and len(err) == 1, err
    assert f"argument {option}: " in err[0], err
    return err[0]


@pytest.mark.parametrize("option,value", [
    ("--max-length", "0"), ("--max-length", "-5"), ("--max-length", "1000000"), ("--shards", "-1"),
    ("--shards", "1e9"), ("--slices", "nan"), ("--epochs", "nan"), ("--epochs", "1e999999999"), ("--epochs", "-1"),
    ("--epochs", "inf"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "-1"), ("--batch-size", "0"),
    ("--batch-size", "100000000"), ("--lora-r", "0"), ("--lora-alpha", "-1"), ("--seed", "-1"),
    ("--seed", "9" * 5000), ("--shots", "0"), ("--partitions", "0"), ("--partitions", "100000"), ("--eps", "nan"),
    ("--eps", "0"), ("--gamma", "inf"), ("--gamma", "2"), ("--iters", "0"), ("--actor-cpus", "-1"),
    ("--actor-cpus", "nan"), ("--actor-cpus", "inf"), ("--actor-gpus", "nan"),
])
def test_numeric_train_options_refuse_nan_inf_and_absurd_values(option, value, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(6))
    line = usage_error(["train", "--data", data, "--run", "r", "--store", str(tmp_path / "s"), f"{option}={value}"],
                       capsys, option)
    assert ("must be " in line or "invalid int value" in line) and line.endswith("; see unlearn train --help")
    assert not (tmp_path / "s").exists()


def test_max_length_is_bounded_by_the_model_positions(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(6))
    line = usage_error(["train", "--data", data, "--run", "r", "--store", str(tmp_path / "s"), "--model", "tiny",
                        "--max-length", "100000"], capsys, "--max-length")
    assert 'must be an integer in 8..512 for model "tiny"' in line and "got 100000" in line
    folder = tmp_path / "roberta"
    folder.mkdir()
    (folder / "config.json").write_text('{"max_position_embeddings": 514}')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    assert opt.model_positions(str(folder)) == 512
    assert opt.model_positions("some/hub-id") is None
    opt.check_max_length("some/hub-id", 4096)  # unknown: only the generic bound applies
    with pytest.raises(opt.OptionError, match="8..512"):
        opt.check_max_length(str(folder), 513)
    assert not (tmp_path / "s").exists()


def test_the_preset_positions_are_the_shipped_model_s():
    from core.assets import minilm_dir

    with open(os.path.join(minilm_dir(), "config.json")) as f:
        assert opt.PRESET_POSITIONS["minilm"] == json.load(f)["max_position_embeddings"]


@pytest.mark.parametrize("argv,option", [
    (["serve", "--port", "99999"], "--port"), (["serve", "--port", "-1"], "--port"), (["serve", "--port", "0"], "--port"),
    (["serve", "--host", "not a host"], "--host"), (["serve", "--window", "nan"], "--window"),
    (["delete", "--ids", "r0001", "--window", "nan"], "--window"),
    (["delete", "--ids", "r0001", "--window", "-1"], "--window"),
    (["delete", "--ids", "r0001", "--window", "1e9"], "--window"),
    (["verify", "--shard", "-1"], "--shard"),
])
def test_serving_and_deletion_options_are_checked_before_the_store(trained, capsys, argv, option):
    store, _ = trained
    before = listing(store)
    usage_error([argv[0], "--run", "base", "--store", str(store), *argv[1:]], capsys, option)
    assert listing(store) == before


@pytest.mark.parametrize("command", ["unlock", "drop", "status", "requests", "resume", "delete", "verify", "serve",
                                     "predict", "eval", "train"])
def test_every_command_checks_its_run_name_before_the_store(trained, tmp_path, capsys, command):
    store, data = trained
    extra = {"delete": ["--ids", "r0001"], "predict": ["--input", data], "eval": ["--data", data],
             "train": ["--data", data]}.get(command, [])
    before = listing(store)
    line = usage_error([command, "--run", "../base", "--store", str(store), *extra], capsys, "--run")
    assert "\"../base\" contains '..'" in line
    line = usage_error([command, "--run", "b" + SURROGATE, "--store", str(store), *extra], capsys, "--run")
    assert "lone surrogate U+D800" in line
    assert listing(store) == before


def test_actor_cpus_a_node_cannot_hold_are_refused_before_anything_is_accepted(trained, capsys, monkeypatch):
    store, _ = trained
    asked = []
    monkeypatch.setattr(opt, "ray_node_cpus", lambda address: asked.append(address) or [2.0])
    before = listing(store)
    code, err = cli(["delete", "--run", "base", "--store", str(store), "--ids", "r0001", "--runtime", "ray",
                     "--actor-cpus", "1000"], capsys)
    assert asked == [None] and code == 2 and len(err) == 1, err
    assert err[0] == ("unlearn: error: delete: argument --actor-cpus: 1000 CPUs per actor, but the largest node of "
                      "the Ray cluster has 2; see unlearn delete --help")
    assert not any("accepted" in line for line in err)
    assert listing(store) == before
    opt.check_actor_cpus(2.0, [1.0, 2.0])
    with pytest.raises(opt.OptionError):
        opt.check_actor_cpus(0.5, [])


def test_bounded_is_strict():
    shards = opt.bounded(int, 1, 10)
    assert shards("3") == 3
    for bad in ("0", "11", "-1", "9" * 5000):
        with pytest.raises(argparse.ArgumentTypeError, match="must be an integer in 1..10, got"):
            shards(bad)
    for bad in ("2.5", "nan", "", "1e1"):
        with pytest.raises(ValueError):  # not a number at all: argparse says "invalid int value: '2.5'"
            shards(bad)
    rate = opt.bounded(float, 0, 1, above=True)
    assert rate("1") == 1.0 and rate("1e-9") == 1e-9
    for bad in ("0", "-0.0", "nan", "inf", "-inf", "1.0001"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"must be a number in \(0, 1\]"):
            rate(bad)
    assert opt.epochs("3") == "3" and opt.epochs("1/3") == "1/3"
    assert math.isfinite(float(opt.epochs("1000")))


def test_host_names_are_checked_without_waiting_for_a_stuck_resolver():
    def fail(name, port):
        raise OSError(-2, "Name or service not known")

    assert opt.host_problem("127.0.0.1") is None and opt.host_problem("::1") is None
    assert opt.host_problem("0.0.0.0") is None
    assert "neither an IP address nor a host name" in opt.host_problem("not a host")
    assert "neither" in opt.host_problem("a..b") and "neither" in opt.host_problem("-a")
    assert "does not resolve (Name or service not known)" in opt.host_problem("nosuch.invalid", resolve=fail)
    assert opt.host_problem("localhost", resolve=lambda name, port: None) is None
    import threading

    stuck = threading.Event()
    try:
        assert "did not resolve within 0.05 s" in opt.host_problem(
            "slow.example", resolve=lambda name, port: stuck.wait(5), timeout_s=0.05)
    finally:
        stuck.set()


def test_more_shards_than_records_is_refused_and_empty_shards_warn(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(12))  # 4 owners
    store = tmp_path / "s"
    code, err = cli(["train", "--data", data, "--run", "r", "--store", str(store), "--model", "tiny", "--shards", "400"],
                    capsys)
    assert code == 1 and err == ["unlearn: error: --shards 400: more shards than the 12 records (at most 12)"]
    code, err = cli(["train", "--method", "erase", "--data", data, "--run", "r", "--store", str(store),
                     "--partitions", "13", "--embedder", "tiny"], capsys)
    assert code == 1 and err == ["unlearn: error: --partitions 13: more partitions than the 12 records (at most 12)"]
    assert not store.exists() or not any(p.is_file() for p in store.rglob("*"))

    from sisa.plan import place

    class Args:
        method, shards, seed = "sisa", 6, 0

    records = synthetic_records(12)
    empty = 6 - len({place(r.owner, 0, 6, 1).shard for r in records})
    assert empty >= 2  # 6 shards, 4 owners
    assert opt.check_layout(Args, records).startswith(f"{empty} of 6 shards hold no records")


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


@pytest.mark.parametrize("epochs", ["1e999999999", "-1e999999999", "1e-999999999", "nan", "inf"])
def test_sisa_config_refuses_huge_exponents_at_once_as_a_library_too(epochs):
    """Not only the CLI: a notebook building SisaConfig(epochs=...) must not hang."""
    import time

    from core.errors import UnlearnError
    from sisa.config import SisaConfig

    start = time.monotonic()
    with pytest.raises(UnlearnError, match="config field 'epochs'"):
        SisaConfig(epochs=epochs)
    assert time.monotonic() - start < 1


# -- input files: type and size before reading; paths shown safely; store paths ------------------

def test_devices_and_directories_are_refused_before_anything_is_read(tmp_path, trained, capsys):
    """/dev/zero would be read for ever (24 GB, then the OOM killer): refused at once, by its type."""
    from core.sources import read_lines

    zero = tmp_path / "z.jsonl"
    zero.symlink_to("/dev/zero")
    for load in (load_records, load_texts, read_lines):
        with pytest.raises(UnlearnError, match=r"z.jsonl: a character device, expected a regular file$"):
            load(str(zero))
    with pytest.raises(UnlearnError, match="^/dev/zero: a character device, expected a regular file$"):
        read_lines("/dev/zero")
    with pytest.raises(UnlearnError, match="a directory, expected a regular file$"):
        read_lines(str(tmp_path))
    with pytest.raises(UnlearnError, match="is a directory, expected a .jsonl"):
        load_records(str(tmp_path))
    store, _ = trained
    before = listing(store)
    for argv in (["train", "--run", "new", "--model", "tiny", "--data", str(zero)],
                 ["delete", "--run", "base", "--ids-file", "/dev/zero"],
                 ["delete", "--run", "base", "--owners-file", "/dev/zero"]):
        code, err = cli([*argv, "--store", str(store), "--quiet"], capsys)
        assert code == 1 and len(err) == 1 and "a character device, expected a regular file" in err[0], err
    assert listing(store) == before


def test_input_files_and_their_lines_have_a_size_limit(tmp_path, monkeypatch):
    import io
    import sys

    from core import sources

    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 10)
    path = tmp_path / "ids.txt"
    path.write_bytes(b"12345\n1234567890\n123\n")  # a line of exactly the limit passes
    assert sources.read_lines(str(path)) == ["12345", "1234567890", "123"]
    path.write_bytes(b"12345\n123\n12345678901\n1\n")
    with pytest.raises(UnlearnError, match=r"ids.txt:3: line longer than the limit of 10 bytes$"):
        sources.read_lines(str(path))
    path = tmp_path / "d.jsonl"
    path.write_bytes(lines(GOOD[0]))
    with pytest.raises(UnlearnError, match=r"d.jsonl:1: line longer than the limit of 10 bytes$"):
        load_records(str(path))
    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 16 << 20)
    monkeypatch.setattr(sources, "MAX_FILE_BYTES", 100)
    path.write_bytes(lines(*GOOD * 3))
    with pytest.raises(UnlearnError, match=r"d.jsonl: \d+ bytes, over the limit of 100 bytes for an input file$"):
        load_records(str(path))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a text\n" * 20)))  # stdin: read up to the limit
    with pytest.raises(UnlearnError, match=r"^<stdin>: over the limit of 100 bytes for an input file$"):
        load_texts("-")


def test_paths_with_control_characters_are_quoted_in_messages(tmp_path):
    from core.sources import read_lines

    for load, name, expected in ((load_records, "nosuch\x1b[31m.jsonl", '"nosuch\\u001b[31m.jsonl": no such file'),
                                 (load_texts, "nosuch\n.txt", '"nosuch\\n.txt": no such file'),
                                 (read_lines, "ids\r.txt", '"ids\\r.txt": no such file')):
        with pytest.raises(UnlearnError) as err:
            load(name)
        assert str(err.value) == expected
    path = tmp_path / "bad\x07.jsonl"
    path.write_bytes(lines(GOOD[0], "{"))
    with pytest.raises(UnlearnError) as err:
        load_records(str(path))
    assert str(err.value).startswith(quote(str(path)) + ":2: malformed JSON")
    root = tmp_path / "s\u202e"  # a format character (right-to-left override): allowed, but shown escaped
    (root / "k").mkdir(parents=True)
    with pytest.raises(UnlearnError) as err:
        LocalStore(str(root)).get("k")
    assert str(err.value).startswith(f"store {quote(str(root))}: cannot read k")


@pytest.mark.parametrize("uri", ["file:///tmp/x%00y", "file:///tmp/x%1b[31my", "/tmp/a\nb", "/tmp/a\x00b",
                                 "s3://bucket/a\x1bb"])
def test_store_paths_with_nul_or_control_characters_are_refused_at_open(uri, capsys):
    with pytest.raises(UnlearnError, match=r"contains the control character U\+00(00|1B|0A); choose one without"):
        open_store(uri)
    code, err = cli(["status", "--run", "base", "--store", uri], capsys)
    assert code == 1 and len(err) == 1 and "control character" in err[0] and err[0].isprintable(), err
    if "%" not in uri and "s3" not in uri:
        with pytest.raises(UnlearnError, match="control character"):
            LocalStore(uri)


@pytest.mark.parametrize("option,value", [
    ("--epochs", "1_0"), ("--epochs", " 1"), ("--epochs", "1/3 "), ("--seed", "\u0663"), ("--seed", "1_0"),
    ("--shards", " 2"), ("--shards", "\uff12"), ("--lr", "1_0e-3"), ("--lr", "\u0661e-3"), ("--gamma", "0.5 "),
    ("--store", ""), ("--labels", ""), ("--labels", " , "), ("--data", ""),
])
def test_lenient_option_values_are_refused(option, value, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(6))
    argv = ["train", "--run", "r", "--store", str(tmp_path / "s"), "--data", data]
    usage_error([*argv, f"{option}={value}"], capsys, option)
    assert not (tmp_path / "s").exists()
    assert opt.epochs("1/3") == "1/3" and opt.epochs(".5") == ".5" and opt.epochs("1e1") == "1e1"
    assert opt.bounded(int, 0, 10)("+3") == 3 and opt.bounded(float, 0, 1)("5E-1") == 0.5


@pytest.mark.parametrize("option,value", [("--ids", ""), ("--owners-file", "")])
def test_empty_delete_targets_are_refused(option, value, trained, capsys):
    store, _ = trained
    usage_error(["delete", "--run", "base", "--store", str(store), f"{option}={value}"], capsys, option)


def test_delete_takes_no_more_ids_than_one_http_request(trained, tmp_path, capsys, monkeypatch):
    from cluster import http_api

    assert http_api.MAX_NAMES == 10_000
    monkeypatch.setattr(http_api, "MAX_NAMES", 3)
    store, _ = trained
    before = listing(store)
    path = tmp_path / "ids.txt"
    path.write_text("r0001\nr0002\nr0003\nr0004\n")
    for argv, expected in (
            (["--ids-file", str(path)], f"--ids-file {path}: 4 ids, more than the 3 a deletion request may carry; "
                                        "split the file into requests of at most 3"),
            (["--owners", "a,b,c,d"], "--owners: 4 owners, more than the 3 a deletion request may carry; "
                                      "split them into requests of at most 3")):
        code, err = cli(["delete", "--run", "base", "--store", str(store), *argv, "--quiet"], capsys)
        assert (code, err) == (1, [f"unlearn: error: {expected}"])
    assert listing(store) == before
