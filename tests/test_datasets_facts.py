"""dataset:facts: fictitious people's facts as prompt/completion records, generated in code
(no file, no network, no model): determinism, splits by person, options and their errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from core import datasets
from core.datasets import FACT_KINDS, load_dataset
from core.errors import UnlearnError
from core.sources import load_records
from proc_helpers import cli_in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def as_json(records) -> list[dict]:
    return [r.to_json() for r in records]


def owners(records) -> set[str]:
    return {r.owner for r in records}


def test_default_records_look_as_documented():
    recs = load_records("dataset:facts")
    assert len(recs) == 32 * 4 and len(owners(recs)) == 32
    assert all(r.form == "prompt/completion" and r.label == "" for r in recs)
    assert owners(recs) == {f"person-{i:03d}" for i in range(32)}
    first = recs[:4]
    assert [r.id for r in first] == [f"person-000-{kind}" for kind in FACT_KINDS[:4]]
    name = re.fullmatch(r"Question: Where was (.+) born\?\nAnswer:", first[0].text).group(1)
    assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", name)
    assert all(name in r.text and r.text.startswith("Question: ") and r.text.endswith("\nAnswer:") for r in first)
    assert re.fullmatch(r" [A-Z][a-z]+\.", first[0].completion)  # an invented town
    assert re.fullmatch(r" The [A-Z][a-z-]+ [A-Z][a-z]+\.", first[2].completion)
    assert re.fullmatch(r" [0-9]{1,2} [A-Z][a-z]+ (19[4-9][0-9]|200[0-5])\.", first[3].completion)


def test_every_record_is_well_formed_and_unique():
    for spec in ("dataset:facts?facts=6&people=40&holdout=10", "dataset:facts?split=holdout&facts=6&paraphrased=1"):
        recs = load_dataset(spec)
        assert len({r.id for r in recs}) == len(recs)
        for r in recs:
            assert r.completion.startswith(" ") and r.completion.endswith(".") and len(r.completion) > 2
            assert r.completion[1] != " " and "\n" not in r.completion


def test_names_distinct_and_values_mostly_distinct():
    people = datasets.facts_people(200, 50, seed=3)
    names = [name for _, name, _ in people]
    assert len(set(names)) == len(names) == 250
    for kind in ("birthplace", "book", "birthdate", "pet"):  # invented values are drawn again on a clash
        assert len({values[kind] for _, _, values in people}) == 250, kind
    assert len({values["profession"] for _, _, values in people}) > 10  # a list: repeats are fine


def test_same_spec_same_records_in_another_process():
    spec = "dataset:facts?split=retain&people=20&holdout=5&facts=6&seed=11&paraphrased=1"
    here = json.dumps(as_json(load_dataset(spec)))
    assert json.dumps(as_json(load_dataset(spec))) == here
    code = ("import json, sys; from core.datasets import load_dataset; "
            "sys.stdout.write(json.dumps([r.to_json() for r in load_dataset(sys.argv[1])]))")
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONHASHSEED": "12345"}  # Python's hash() must not matter
    out = subprocess.run([sys.executable, "-c", code, spec], env=env, capture_output=True, text=True, timeout=120,
                         check=True, cwd=ROOT)
    assert out.stdout == here


def test_seed_changes_the_people_and_people_extends():
    a, b = load_dataset("dataset:facts?seed=0"), load_dataset("dataset:facts?seed=1")
    assert [r.id for r in a] == [r.id for r in b]
    assert {r.text for r in a}.isdisjoint({r.text for r in b})  # other names in every question
    more = load_dataset("dataset:facts?people=64")
    assert as_json(more[:len(a)]) == as_json(a)  # person-007 is the same person in both
    fewer_facts = load_dataset("dataset:facts?facts=2")
    assert as_json(fewer_facts) == as_json([r for r in a if r.id.endswith(("-birthplace", "-profession"))])


def test_splits_partition_train_by_person():
    spec = "dataset:facts?people=40&holdout=10&facts=3&forget=0.25&seed=5"
    split = {s: load_dataset(f"{spec}&split={s}") for s in ("all", "train", "forget", "retain", "holdout")}
    assert as_json(split["all"]) == as_json(split["train"])
    train_ids = {r.id for r in split["train"]}
    forget_ids, retain_ids = {r.id for r in split["forget"]}, {r.id for r in split["retain"]}
    assert forget_ids | retain_ids == train_ids and not forget_ids & retain_ids
    assert len(owners(split["forget"])) == 10 and len(split["forget"]) == 30  # round(0.25 * 40), 3 facts each
    assert len(split["retain"]) == 90 and len(split["holdout"]) == 30 and len(split["train"]) == 120
    # whole people: nobody has facts on both sides, and non-members were never in train
    assert owners(split["forget"]).isdisjoint(owners(split["retain"]))
    assert owners(split["holdout"]).isdisjoint(owners(split["train"]))
    assert all(o.startswith("outsider-") for o in owners(split["holdout"]))
    train_names = {r.text.split("Where was ")[1] for r in split["train"] if r.id.endswith("-birthplace")}
    holdout_names = {r.text.split("Where was ")[1] for r in split["holdout"] if r.id.endswith("-birthplace")}
    assert train_names.isdisjoint(holdout_names)


@pytest.mark.parametrize("query, forget_people", [
    ("", 3),  # round(0.1 * 32)
    ("&forget=0.01", 1),  # at least one person when forget > 0
    ("&people=10&forget=0.5", 5),
    ("&people=7&forget=1", 7),
])
def test_forget_size(query, forget_people):
    recs = load_dataset(f"dataset:facts?split=forget{query}")
    assert len(owners(recs)) == forget_people and len(recs) == 4 * forget_people


def test_forget_is_a_keyed_choice_that_grows_with_the_fraction():
    small = owners(load_dataset("dataset:facts?split=forget&forget=0.1"))
    large = owners(load_dataset("dataset:facts?split=forget&forget=0.3"))
    assert small < large
    assert owners(load_dataset("dataset:facts?split=forget&seed=1")) != small  # keyed by the seed
    assert small != {f"person-{i:03d}" for i in range(len(small))}  # not simply the first people


def test_paraphrased_same_answers_other_questions():
    for split in ("train", "forget", "holdout"):
        plain = load_dataset(f"dataset:facts?split={split}&facts=6")
        para = load_dataset(f"dataset:facts?split={split}&facts=6&paraphrased=1")
        assert [r.id for r in para] == [r.id + "~p" for r in plain]
        for p, r in zip(para, plain):
            assert p.completion == r.completion and p.owner == r.owner and p.text != r.text
            assert p.text.startswith("Question: ") and p.text.endswith("\nAnswer:")
    train_ids = {r.id for r in load_dataset("dataset:facts?split=train&facts=6")}
    assert train_ids.isdisjoint(r.id for r in load_dataset("dataset:facts?paraphrased=1&facts=6"))


def test_limit_is_a_stable_keyed_subset_also_when_paraphrased():
    whole = {r.id for r in load_dataset("dataset:facts")}
    ten = load_dataset("dataset:facts?limit=10")
    assert len(ten) == 10 and {r.id for r in ten} <= whole
    assert as_json(ten) == as_json(load_dataset("dataset:facts?limit=10"))
    para = load_dataset("dataset:facts?limit=10&paraphrased=1")
    assert sorted(r.id for r in para) == sorted(r.id + "~p" for r in ten)
    assert len(load_dataset("dataset:facts?split=holdout&limit=1000")) == 32


@pytest.mark.parametrize("spec, message", [
    ("dataset:facts?people=0", "dataset:facts?people=0: option 'people' must be an integer in 1..100000, got '0'"),
    ("dataset:facts?people=3.5", "option 'people' must be an integer in 1..100000, got '3.5'"),
    ("dataset:facts?holdout=-1", "option 'holdout' must be an integer in 0..100000, got '-1'"),
    ("dataset:facts?facts=7", "dataset:facts?facts=7: option 'facts' must be an integer in 1..6, got '7'"),
    ("dataset:facts?facts=0", "option 'facts' must be an integer in 1..6, got '0'"),
    ("dataset:facts?forget=1.5", "dataset:facts?forget=1.5: option 'forget' must be a number in 0..1"),
    ("dataset:facts?forget=nan", "option 'forget' must be a number in 0..1"),
    ("dataset:facts?seed=x", "option 'seed' must be an integer in 0..9223372036854775807, got 'x'"),
    ("dataset:facts?paraphrased=yes", "option 'paraphrased' must be 0 or 1, got 'yes'"),
    ("dataset:facts?split=test", "dataset:facts?split=test: option 'split' must be all, train, forget, retain or "
                                 "holdout, got 'test'"),
    ("dataset:facts?people=3&shots=2", "dataset:facts?people=3&shots=2: unknown option 'shots'; dataset:facts "
                                       "takes split, people, holdout, facts, forget, seed, paraphrased, limit"),
    ("dataset:facts?limit=0", "option 'limit' must be a positive integer, got '0'"),
    ("dataset:facts?split=forget&forget=0", "split 'forget' has no records"),
    ("dataset:facts?split=holdout&holdout=0", "split 'holdout' has no records"),
    ("dataset:rotten_tomatoes?people=3", "dataset:rotten_tomatoes?people=3: unknown option 'people'"),
    ("dataset:intent_recognition?split=forget", "option 'split' must be train, test or all, got 'forget'"),
    ("dataset:fact", "unknown data set 'fact'; known: facts, intent_recognition, rotten_tomatoes, bigbench/<task>"),
])
def test_bad_specs_are_one_line_errors(spec, message, monkeypatch):
    def no_corpus():
        raise AssertionError("the corpus was loaded before the options were checked")

    monkeypatch.setitem(datasets.DATASETS, "rotten_tomatoes", no_corpus)
    monkeypatch.setitem(datasets.DATASETS, "intent_recognition", no_corpus)
    with pytest.raises(UnlearnError) as info:
        load_records(spec)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_reads_the_spec(tmp_path, capsys, monkeypatch):
    """`unlearn train --data dataset:facts...` loads the data before any model: a bad option
    is its one error line, and a good spec gets as far as the layout check."""
    seen = []
    real = datasets.load_dataset

    def spy(spec):
        seen.append(real(spec))
        return seen[-1]

    monkeypatch.setattr(datasets, "load_dataset", spy)
    store = str(tmp_path / "store")
    code, _out, err = cli_in_process(["train", "--run", "f", "--store", store, "--objective", "lm",
                                      "--data", "dataset:facts?split=test"], capsys)
    assert code != 0 and len(err) == 1
    assert "dataset:facts?split=test: option 'split' must be all, train, forget, retain or holdout" in err[0]
    # more shards than people: refused after the records were loaded, before any model
    code, _out, err = cli_in_process(["train", "--run", "f", "--store", store, "--objective", "lm", "--shards", "40",
                                      "--data", "dataset:facts?people=2&split=retain&forget=0"], capsys)
    assert len(seen) == 1 and len(seen[0]) == 8
    assert all(r.form == "prompt/completion" for r in seen[0])
    assert code != 0 and err == ["unlearn: error: --shards 40: more shards than the 8 records (at most 8)"]
