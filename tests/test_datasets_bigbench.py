"""BIG-bench tasks as data sets, on a tiny synthetic archive laid out like bigbench-1.0.0.tar.gz
(no download in tests: the pip download step is replaced and counted)."""
from __future__ import annotations

import io
import json
import os
import re
import tarfile

import pytest

from core import assets, datasets
from core.errors import UnlearnError
from core.sources import load_records

TASK = {
    "name": "toy_intent",
    "examples": [
        {"input": "Utterance: play some jazz", "target_scores": {"play_music": 1, "get_weather": 0}},
        {"input": "Utterance: will it rain tomorrow", "target_scores": {"play_music": 0, "get_weather": 1}},
        {"input": "Utterance: both right", "target_scores": {"play_music": 1, "get_weather": 1}},  # skipped
        {"input": "Utterance: a generative example", "target": "no scores"},  # skipped
        {"input": "Utterance:   put on the radio ", "target_scores": {"play_music": 1, "get_weather": 0}},
    ]
    + [{"input": f"Utterance: weather {i}", "target_scores": {"play_music": 0, "get_weather": 1}} for i in range(20)],
}


def _archive(path: str, tasks: dict[str, dict]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in tasks.items():
            raw = json.dumps(data).encode()
            info = tarfile.TarInfo(f"{datasets.BIGBENCH_TASKS}/{name}/task.json")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        info = tarfile.TarInfo(f"{datasets.BIGBENCH_TASKS}/with_subtasks/sub/task.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder; a 'download' writes the synthetic archive and is counted."""
    monkeypatch.setattr(assets, "CACHE_DIR", str(tmp_path))
    calls = []

    def fake_download(dest):
        calls.append(dest)
        _archive(os.path.join(dest, datasets.BIGBENCH_ARCHIVE), {"toy_intent": TASK, "intent_recognition": TASK})

    monkeypatch.setattr(datasets, "_pip_download", fake_download)
    return tmp_path, calls


def test_records_from_synthetic_archive(cache):
    tmp, calls = cache
    recs = load_records("dataset:bigbench/toy_intent")
    assert len(calls) == 1
    by_id = {r.id: r for r in recs}
    assert len(recs) == 23  # 25 examples, 2 without exactly one right choice
    assert "toy_intent-00002" not in by_id and "toy_intent-00003" not in by_id
    assert by_id["toy_intent-00000"].text == "play some jazz"  # 'Utterance: ' stripped
    assert by_id["toy_intent-00000"].label == "play_music"
    assert by_id["toy_intent-00001"].label == "get_weather"
    assert by_id["toy_intent-00004"].text == "put on the radio"
    assert all(r.owner == r.id for r in recs)
    assert (tmp / "bigbench" / "toy_intent" / "task.json").exists()
    assert not [p for p in os.listdir(tmp) if ".tmp-" in p]  # no leftovers of the download


def test_archive_downloaded_once_and_task_cached(cache):
    tmp, calls = cache
    load_records("dataset:bigbench/toy_intent")
    os.remove(tmp / datasets.BIGBENCH_ARCHIVE)  # the cached task.json suffices now
    again = load_records("dataset:bigbench/toy_intent?split=all")
    assert len(calls) == 1 and len(again) == 23
    load_records("dataset:intent_recognition")  # another task: archive needed again
    assert len(calls) == 2


def test_split_and_limit_follow_the_module_conventions(cache):
    train = load_records("dataset:intent_recognition?split=train")
    test = load_records("dataset:intent_recognition?split=test")
    assert {r.id for r in train}.isdisjoint(r.id for r in test)
    assert len(train) + len(test) == 23
    five = load_records("dataset:intent_recognition?limit=5")
    assert len(five) == 5 and [r.id for r in five] == sorted(r.id for r in five)
    assert five == load_records("dataset:intent_recognition?limit=5")


def test_common_prefix_only_stripped_when_every_input_has_it():
    data = {"examples": [{"input": "Utterance: a", "target_scores": {"x": 1, "y": 0}},
                         {"input": "Question: b", "target_scores": {"x": 0, "y": 1}}]}
    texts = [r.text for r in datasets.bigbench_records("t", data, "t.json")]
    assert texts == ["Utterance: a", "Question: b"]


@pytest.mark.parametrize("spec, message", [
    ("dataset:bigbench/NoSuch", "must be lower-case"),
    ("dataset:bigbench/../etc", "must be lower-case"),
    ("dataset:bigbench/missing_task", "no bigbench-1.0.0/bigbench/benchmark_tasks/missing_task/task.json"),
    ("dataset:bigbench/with_subtasks", "a task with subtasks"),
    ("dataset:bigbench/toy_intent?shots=3", "unknown option 'shots'"),
])
def test_bad_specs_are_one_line_errors(cache, spec, message):
    with pytest.raises(UnlearnError, match=re.escape(message)) as info:
        load_records(spec)
    assert "\n" not in str(info.value)


def test_task_without_multiple_choice_examples():
    with pytest.raises(UnlearnError, match="no multiple-choice examples"):
        datasets.bigbench_records("gen", {"examples": [{"input": "q", "target": "a"}]}, "gen/task.json")


def test_failed_download_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "CACHE_DIR", str(tmp_path))

    class Failed:
        returncode, stderr = 1, "ERROR: No matching distribution found for bigbench==1.0.0\n"

    monkeypatch.setattr(datasets.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(UnlearnError, match="cannot download bigbench==1.0.0 with pip .ERROR: No matching"):
        load_records("dataset:intent_recognition")
    assert os.listdir(tmp_path) == []
