"""The installed console script: help texts, exit codes, one-line errors."""
import json
import os
import subprocess
import sys

import pytest

from cluster.cli import main
from conftest import synthetic_records, write_jsonl

UNLEARN = os.path.join(os.path.dirname(sys.executable), "unlearn")


def test_console_script_help_lists_every_command():
    out = subprocess.run([UNLEARN, "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("train", "delete", "verify", "status", "predict", "eval", "drop"):
        assert cmd in out
    train = subprocess.run([UNLEARN, "train", "--help"], capture_output=True, text=True, check=True).stdout
    for opt in ("--data", "--run", "--store", "--shards", "--slices", "--model", "--epochs", "--seed", "--json"):
        assert opt in train


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["delete", "--run", "r"])  # one of --ids/--ids-file/--owners is required
    assert exc.value.code == 2


def test_unknown_run_is_one_line(tmp_path):
    proc = subprocess.run([UNLEARN, "status", "--run", "nope", "--store", str(tmp_path), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f'unlearn: error: run "nope" not found in store {tmp_path}']


def test_bad_run_name_and_config(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(6))
    with pytest.raises(SystemExit) as exc:  # option values are usage errors (exit 2)
        main(["train", "--data", data, "--run", "../x", "--store", str(tmp_path / "s")])
    assert exc.value.code == 2
    assert "argument --run: \"../x\" contains '..'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", data, "--run", "x", "--store", str(tmp_path / "s"), "--shards", "0"])
    assert exc.value.code == 2
    assert "argument --shards: must be an integer in 1..10000, got 0" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_ids_file_and_its_errors(tmp_path, capsys):
    store = str(tmp_path / "s")
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(12))
    assert main(["train", "--data", data, "--run", "r", "--store", store, "--model", "tiny", "--shards", "2",
                 "--slices", "2", "--quiet"]) == 0
    bad = tmp_path / "ids.txt"
    bad.write_bytes(b"r0001\nr\xff02\n")
    assert main(["delete", "--run", "r", "--store", store, "--ids-file", str(bad)]) == 1
    assert f"{bad}:2: not valid UTF-8 (byte 0xff at column 2)" in capsys.readouterr().err
    good = tmp_path / "ok.txt"
    good.write_text("r0001\n\nr0004\n")
    capsys.readouterr()
    assert main(["delete", "--run", "r", "--store", store, "--ids-file", str(good), "--json", "--quiet"]) == 0
    receipt = json.loads(capsys.readouterr().out)
    assert receipt["ids"] == ["r0001", "r0004"] and receipt["version"] == 2


def test_train_refuses_an_existing_run(tmp_path, capsys):
    store = str(tmp_path / "s")
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(8))
    args = ["train", "--data", data, "--run", "r", "--store", store, "--model", "tiny", "--shards", "1",
            "--slices", "1", "--quiet"]
    assert main(args) == 0
    assert main(args) == 1
    assert 'run "r" already exists' in capsys.readouterr().err
    assert main(["drop", "--run", "r", "--store", store]) == 0
    assert main(["status", "--run", "r", "--store", store]) == 1
    assert main(["drop", "--run", "r", "--store", store, "--missing-ok"]) == 0


@pytest.mark.integration
def test_missing_bucket_is_one_line(seaweedfs, monkeypatch, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(6))
    env = {**os.environ, **seaweedfs.env()}
    proc = subprocess.run([UNLEARN, "train", "--data", data, "--run", "r", "--store", "s3://no-such-bucket/x",
                           "--model", "tiny", "--quiet"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == ["unlearn: error: s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist (NoSuchBucket)"]
    assert seaweedfs.secret_key not in proc.stderr


@pytest.mark.integration
def test_wrong_credentials_are_one_line_without_secrets(seaweedfs, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(6))
    env = {**os.environ, **seaweedfs.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret-value"}
    proc = subprocess.run([UNLEARN, "train", "--data", data, "--run", "r", "--store", "s3://any-bucket/x",
                           "--model", "tiny", "--quiet"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3://any-bucket/x" in lines[0], lines
    assert "wrong-secret-value" not in proc.stderr and seaweedfs.secret_key not in proc.stderr


def test_gpu_options_without_a_gpu_are_one_line_errors(tmp_path, capsys):
    """This machine has no GPU: a cuda run must fail up front with one line and leave
    nothing behind; GPU shares are reserved only for cuda runs and only where GPUs exist."""
    import torch

    from cluster.runtime import actor_gpus_for
    from sisa.config import SisaConfig
    from core.errors import UnlearnError

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the no-GPU error paths cannot be exercised here")
    store = tmp_path / "s"
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(8))
    assert main(["train", "--data", data, "--run", "g", "--store", str(store), "--model", "tiny", "--shards", "2",
                 "--slices", "1", "--device", "cuda", "--runtime", "local", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["unlearn: error: config device 'cuda': no CUDA GPU is visible in this process (on Ray, give "
                   "shard actors GPUs with --actor-gpus; or train with --device cpu)"]
    assert not any(p.is_file() for p in store.rglob("*"))
    cpu, cuda = SisaConfig(shards=4), SisaConfig(shards=4, extra={"device": "cuda"})
    assert cpu.digest() != cuda.digest() and cpu.digest() == SisaConfig(shards=4, extra={}).digest()
    assert actor_gpus_for(cpu, 2.0, None) == 0.0
    assert actor_gpus_for(cuda, 2.0, None) == 0.5 and actor_gpus_for(cuda, 8.0, None) == 1.0
    assert actor_gpus_for(cuda, 2.0, 0.25) == 0.25
    for config, gpus, req, msg in ((cpu, 2.0, 1.0, "this run trains on the CPU"),
                                   (cuda, 0.0, None, "the Ray cluster has no GPUs"),
                                   (cuda, 1.0, 2.0, "at most the cluster's 1 GPUs")):
        with pytest.raises(UnlearnError, match=msg):
            actor_gpus_for(config, gpus, req)
    with pytest.raises(UnlearnError, match="config field 'extra.device'"):
        SisaConfig(extra={"device": "tpu"})


def test_usage_errors_are_one_line(tmp_path):
    for argv, message in ((["plan", "--rate", "-1/day"], "plan: argument --rate: expected one argument "
                                                          "(a value that starts with '-' goes after '='"),
                          (["train", "--run", "x", "--data", "y", "--shards", "q"],
                           "train: argument --shards: invalid int value: 'q'"),
                          ([], "the following arguments are required: COMMAND")):
        proc = subprocess.run([UNLEARN, *argv], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("unlearn: error: ") and message in lines[0], lines
