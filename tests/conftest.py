"""Shared fixtures: synthetic records, a real SeaweedFS S3 server, an in-memory moto server."""
from __future__ import annotations

import json
import os
import sys
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "deploy"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# logic tests drive the in-process engine; tests of the Ray runtime pass --runtime ray
os.environ["UNLEARN_RUNTIME"] = "local"
# never attach to a cluster a developer started with `unlearn up` (a folder nobody creates;
# tests of `up` set their own)
os.environ["UNLEARN_HOME"] = os.path.join("/tmp", f"unlearn-test-home-{os.getpid()}-absent")

from core.records import Record  # noqa: E402

POS = ["good", "great", "wonderful", "brilliant", "fun", "moving", "sharp", "clever"]
NEG = ["bad", "dull", "awful", "boring", "messy", "flat", "tedious", "weak"]
FILL = ["film", "plot", "actors", "story", "ending", "script", "score", "pace", "really", "quite"]


def synthetic_records(n: int = 60, owners_every: int = 3, seed: int = 0) -> list[Record]:
    """Short sentiment-like texts; every `owners_every` consecutive records share an owner."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "pos" if rng.random() < 0.5 else "neg"
        words = [rng.choice(POS if label == "pos" else NEG) for _ in range(2)] + rng.sample(FILL, 4)
        rng.shuffle(words)
        out.append(Record(f"r{i:04d}", f"{' '.join(words)} #{i}", label, f"owner{i // owners_every:03d}"))
    return out


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json() if isinstance(r, Record) else r) + "\n")
    return str(path)


@pytest.fixture
def records():
    return synthetic_records()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A real SeaweedFS (`weed mini`) on loopback with credentials required."""
    from seaweedfs import SeaweedFS

    server = SeaweedFS(str(tmp_path_factory.mktemp("weed")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(seaweedfs, monkeypatch):
    """A fresh versioned bucket on the SeaweedFS server, with AWS_* pointing at it."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    client = seaweedfs.client()
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    for k, v in seaweedfs.env().items():
        monkeypatch.setenv(k, v)
    return name


@pytest.fixture(scope="session")
def moto_server():
    from moto.server import ThreadedMotoServer

    from seaweedfs import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (init ~5 s, and actors cost ~4.5 s each to start)."""
    from cluster.runtime import init_ray

    import ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
