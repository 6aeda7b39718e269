"""`unlearn up` / `unlearn down`: one long-running local Ray that later commands attach to.

The pure parts (the state file, its folder) run in this process; the cluster test starts
one real cluster (`up`), trains and deletes twice on it through the CLI, checks that the
second delete reused the warm coordinator, that every socket of the cluster is on
loopback and needs the token, that the token is in no command line, and that `down`
leaves no process of it. About a minute on 2 cores (marked integration)."""
import json
import os
import stat
import subprocess
import time

import pytest

from cluster import up
from conftest import synthetic_records, write_jsonl
from proc_helpers import cli_env, cli_in_process, ray_processes, run_cli, sockets_of

TINY = ["--model", "tiny", "--shards", "2", "--slices", "2", "--max-length", "32", "--batch-size", "4",
        "--labels", "neg,pos"]
LOOPBACK = ("127.", "::ffff:127.")


def a_state(where, **change) -> dict:
    state = up.ClusterState(address="127.0.0.1:6390", token_file=str(where / up.TOKEN),
                            temp_dir="/tmp/unlearn-ray-abc", session=4242, started=1.0e9, num_cpus=2,
                            pids=((4243, 1.0e9 + 1),)).to_json()
    return {**state, **change}


# -- pure parts -------------------------------------------------------------------------------

def test_the_state_file_reads_back_what_up_writes(tmp_path):
    state = up.parse_state(json.dumps(a_state(tmp_path)), tmp_path)
    assert state.address == "127.0.0.1:6390" and state.pids == ((4243, 1.0e9 + 1),) and state.session == 4242
    up.prepare_home(tmp_path / "h")
    up.write_state(tmp_path / "h", up.ClusterState(**{**state.__dict__, "token_file": str(tmp_path / "h" / up.TOKEN)}))
    got, problem = up.read_state(tmp_path / "h")
    assert problem is None and got.temp_dir == state.temp_dir
    assert stat.S_IMODE(os.stat(tmp_path / "h" / up.STATE).st_mode) == 0o600


@pytest.mark.parametrize("change, why", [
    ({"version": 2}, "not a version 1 state object"),
    ({"address": "10.0.0.7:6379"}, "is not 127.0.0.1:PORT"),
    ({"address": "127.0.0.1:http"}, "is not 127.0.0.1:PORT"),
    ({"address": 6379}, "is not 127.0.0.1:PORT"),
    ({"token_file": "/etc/shadow"}, "token_file is not"),
    ({"temp_dir": "/home/me"}, "is not a folder unlearn-ray-*"),
    ({"temp_dir": "unlearn-ray-x"}, "is not a folder unlearn-ray-*"),
    ({"temp_dir": "/tmp/unlearn-ray-x/../.."}, "is not a folder unlearn-ray-*"),
    ({"pids": [[1, 2.0]]}, "pids is not"),
    ({"pids": [["7", 2.0]]}, "pids is not"),
    ({"session": True}, "'session' is not a number"),
    ({"num_cpus": 0}, "'num_cpus' is not a number"),
])
def test_a_state_file_up_did_not_write_is_refused_with_the_reason(tmp_path, change, why):
    """A hand-edited or damaged file must not make a command join another address, read
    another file as its token, or make `down` stop other processes."""
    with pytest.raises(up.StateError, match=why.replace("*", r"\*").replace("(", r"\(")):
        up.parse_state(json.dumps(a_state(tmp_path, **change)), tmp_path)


def test_down_after_a_reboot_stops_nothing(tmp_path):
    """The recorded session id and pids may name other processes after a reboot. The live
    session is a child's own: this test's session id may be 0 or 1 in a container (CI)."""
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        state = up.parse_state(json.dumps(a_state(tmp_path, session=child.pid, pids=[[child.pid, 1.0]])), tmp_path)
        assert up.processes(state) == []  # started in 2001, before this boot
    finally:
        child.kill()
        child.wait()


def test_a_raylet_too_slow_to_register_is_tried_once_more(tmp_path, monkeypatch):
    """Ray gives its raylet a fixed 30 s; on a busy machine (load average 22 here) one start failed."""
    tries = []

    def launch(where, num_cpus, port):
        tries.append(port)
        if len(tries) < 3:
            raise up.SlowStart("The current node timed out during startup.")
        return "started"

    monkeypatch.setattr(up, "_launch", launch)
    with pytest.raises(up.UnlearnError, match=r"^cannot start a Ray cluster: The current node timed out during "
                                              r"startup. \(tried 2 times; is the machine overloaded\?\)$"):
        up.start(tmp_path, 2, None)
    assert up.start(tmp_path, 2, None) == "started" and len(tries) == 3


def test_read_state_says_none_for_no_file_and_why_for_a_bad_one(tmp_path):
    assert up.read_state(tmp_path) == (None, None)
    (tmp_path / up.STATE).write_text("{not json")
    state, problem = up.read_state(tmp_path)
    assert state is None and problem == f"{tmp_path / up.STATE} is not a state file of `unlearn up`: not JSON"


def test_the_home_folder_is_made_private(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    up.prepare_home(loose)
    up.prepare_home(tmp_path / "new" / "home")
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new" / "home").stat().st_mode) == 0o700


def test_a_stale_state_file_is_a_note_and_the_command_runs_as_without_it(tmp_path, monkeypatch, capsys):
    """Nothing answers at the recorded address: one note line, no Ray settings changed."""
    home = tmp_path / "home"
    up.prepare_home(home)
    (home / up.TOKEN).write_text("0" * 64)
    (home / up.STATE).write_text(json.dumps(a_state(home, address=f"127.0.0.1:{up.free_port()}")))
    monkeypatch.setenv("UNLEARN_HOME", str(home))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    store = str(tmp_path / "s")
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(12))
    assert cli_in_process(["train", "--data", data, "--run", "r", "--store", store, *TINY, "--runtime", "local",
                           "--quiet"], capsys)[0] == 0
    code, out, err = cli_in_process(["status", "--run", "r", "--store", store, "--json"], capsys)
    assert code == 0 and "cluster" not in json.loads(out)
    assert len(err) == 1 and err[0].startswith("unlearn: note: the Ray cluster `unlearn up` started is gone "), err
    assert "RAY_AUTH_MODE" not in os.environ and "RAY_AUTH_TOKEN_PATH" not in os.environ


def test_down_with_nothing_up_says_one_line_and_up_refuses_bad_input_before_starting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UNLEARN_HOME", str(tmp_path / "home"))
    assert cli_in_process(["down"], capsys) == (0, "", ["unlearn: no Ray cluster started by `unlearn up` "
                                                        "(nothing to stop)"])
    code, _out, err = cli_in_process(["up", "--store", str(tmp_path)], capsys)
    assert code == 2 and err == ["unlearn: error: up: argument --store: is for --run (the runs to start warm); "
                                 "see unlearn up --help"]
    code, _out, err = cli_in_process(["up", "--store", str(tmp_path / "s"), "--run", "nope"], capsys)
    assert code == 1 and len(err) == 1 and "not found" in err[0], err
    assert not (tmp_path / "home" / up.STATE).exists()
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _out, err = cli_in_process(["up", "--port", str(port)], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"unlearn: error: --port {port}: 127.0.0.1:{port} is in "
                                                             f"use ("), err
    assert not (tmp_path / "home" / up.STATE).exists() and not (tmp_path / "home" / up.TOKEN).exists()
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "home" / up.STATE).write_text("[]")
    code, _out, err = cli_in_process(["down"], capsys)
    assert code == 0 and len(err) == 1 and "not a version 1 state object; removed it" in err[0], err
    assert not (tmp_path / "home" / up.STATE).exists()


def test_a_coordinator_built_for_an_earlier_training_is_replaced_not_used(monkeypatch, tmp_path):
    """A run dropped and trained again under its name (another config): the warm coordinator
    on the cluster still holds the old one, and must not serve or apply with it."""
    from cluster import runtime
    from core.store import LocalStore

    class Handle:
        def __init__(self, built_for):
            self.built_for = type("M", (), {"remote": staticmethod(lambda: built_for)})

    live = [Handle("old")]
    made, killed = [], []

    def get_or_create(store, run, window_s, actor_cpus, detached):
        made.append(detached)
        return live[-1]

    def kill(store, run, handle):
        killed.append(handle)
        live.append(Handle("new"))

    monkeypatch.setattr(runtime, "init_ray", lambda address=None: None)
    monkeypatch.setattr(runtime, "ray_get", lambda value: value)
    monkeypatch.setattr(runtime, "run_identity", lambda store, run: "new")
    monkeypatch.setattr(runtime, "_get_or_create_coordinator", get_or_create)
    monkeypatch.setattr(runtime, "_kill_coordinator", kill)
    store = LocalStore(str(tmp_path))
    handle = runtime.coordinator_actor(store, "r", detached=True)
    assert handle is live[1] and killed == [live[0]] and made == [True, True]
    assert runtime.coordinator_actor(store, "r") is live[1] and len(killed) == 1 and made[-1] is False


def test_run_identity_changes_with_a_new_training_not_with_a_deletion(tmp_path):
    from cluster.runtime import run_identity
    from core.store import LocalStore
    from sisa.config import SisaConfig
    from sisa.run import SisaRun

    store = LocalStore(str(tmp_path))
    records = synthetic_records(12)
    config = SisaConfig(shards=2, slices=1, model="tiny", labels=("neg", "pos"), max_length=32, batch_size=4)
    run = SisaRun.train(store, "r", records, config)
    first = run_identity(store, "r")
    run.delete(ids=["r0001"])
    assert run_identity(store, "r") == first
    SisaRun.drop(store, "r")
    SisaRun.train(store, "r", records, config)  # same config, a new training: a new salt
    assert run_identity(store, "r") != first


# -- one real cluster ------------------------------------------------------------------------------

@pytest.mark.integration
def test_up_train_delete_twice_status_down(tmp_path):
    home, uhome = tmp_path / "home", tmp_path / "uh"
    home.mkdir()
    env = cli_env("ray", HOME=str(home), UNLEARN_HOME=str(uhome))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):  # as a user's shell: none set
        env.pop(var, None)
    store = str(tmp_path / "store")
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(40, owners_every=1))

    def cli(*args, code=0):
        proc = run_cli(*args, env=env, timeout=240)
        assert proc.returncode == code, proc.stderr
        return proc

    proc = cli("up", "--num-cpus", "2", "--json")
    state, problem = up.read_state(uhome)
    try:
        token = (uhome / up.TOKEN).read_text().strip()
        assert problem is None and json.loads(proc.stdout)["address"] == state.address
        assert token not in proc.stdout + proc.stderr + (uhome / up.STATE).read_text()
        for path, mode in ((uhome, 0o700), (uhome / up.STATE, 0o600), (uhome / up.TOKEN, 0o600)):
            assert stat.S_IMODE(path.stat().st_mode) == mode, path
        again = cli("up")
        assert again.stderr.splitlines() == [f"unlearn: a Ray cluster started by `unlearn up` already runs at "
                                             f"{state.address}; `unlearn down` stops it"]
        assert up.read_state(uhome)[0] == state  # not a second cluster

        # in-process: shard actors of a train on Ray are the train's own (they end with it), and
        # on 2 busy cores starting them twice (train, then the coordinator's) took a minute
        cli("train", "--data", data, "--run", "r", "--store", store, *TINY, "--quiet", "--runtime", "local")
        first = cli("delete", "--run", "r", "--store", store, "--ids", "r0003", "--json")
        assert f"unlearn: using the Ray cluster of `unlearn up` at {state.address}" in first.stderr.splitlines()
        pid1 = json.loads(cli("status", "--run", "r", "--store", store, "--json").stdout)["cluster"]["coordinator_pid"]
        t1 = time.monotonic()
        second = json.loads(cli("delete", "--run", "r", "--store", store, "--ids", "r0004", "--json",
                                "--quiet").stdout)
        warm_s = time.monotonic() - t1
        quiet = cli("status", "--run", "r", "--store", store, "--json", "--quiet")
        status = json.loads(quiet.stdout)
        assert quiet.stderr == ""
        assert json.loads(first.stdout)["status"] == second["status"] == "done"
        assert status["records"] == 38 and status["cluster"]["coordinator_pid"] == pid1 and pid1
        assert warm_s < 30, warm_s  # no Ray start, no model load (about 3 s here)

        procs = ray_processes(state.temp_dir, state.session)
        names = {p.name() for p in procs}
        assert "gcs_server" in names and "raylet" in names and any("CoordinatorActor" in n for n in names), names
        exposed = {a: who for a, who in sockets_of(procs).items() if not a[0].startswith(LOOPBACK)}
        assert not exposed, exposed
        assert not any(token in " ".join(p.cmdline()) for p in procs)
        assert not (home / ".ray").exists()  # Ray's default token file (mode 644) was never written
        for root, _dirs, files in os.walk(state.temp_dir):  # Ray's logs and session files
            for f in files:
                path = os.path.join(root, f)
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as fh:
                        assert token.encode() not in fh.read(), path
        _refuses_a_client_without_the_token(state.address, token)
    finally:
        down = cli("down")
    assert down.stderr.startswith(f"unlearn: stopped the Ray cluster at {state.address} (")
    assert ray_processes(state.temp_dir, state.session) == []
    assert not os.path.exists(state.temp_dir) and not (uhome / up.STATE).exists() and not (uhome / up.TOKEN).exists()
    assert cli("down").stderr == "unlearn: no Ray cluster started by `unlearn up` (nothing to stop)\n"


def _refuses_a_client_without_the_token(address: str, token: str) -> None:
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    def ask(meta):
        with grpc.insecure_channel(address) as channel:
            return gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), metadata=meta, timeout=10)

    for wrong in ([], [("authorization", "Bearer " + "0" * 64)]):
        with pytest.raises(grpc.RpcError) as exc:
            ask(wrong)
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ask([("authorization", f"Bearer {token}")]).cluster_id
