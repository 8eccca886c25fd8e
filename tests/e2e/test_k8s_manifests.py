"""docker/k8s checked against the code it deploys, so the manifests cannot drift.

The server's settings are parsed by the real ``Settings`` from the environment the
pod would have (the image's ``ENV`` lines, then the container's ``env``); probe
paths are fetched from the real FastAPI app, with a token set and none sent, as a
kubelet does. The rendered variants (``kubectl kustomize``) run when kubectl is
installed; the raw base always runs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from adamserve.cli import Settings
from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.service import OptimizerService
from adamserve.sessions.store import SessionStore
from adamserve.transports.http.app import create_app

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
PREFIX = "ADAMSERVE_"
Doc = dict[str, Any]


def _load(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(directory: Path = K8S) -> list[Doc]:
    return [d for p in _yaml_files() if p.is_relative_to(directory) for d in _load(p)]


def _one(docs: list[Doc], kind: str) -> Doc:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container(sts: Doc) -> Doc:
    containers = sts["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, [c["name"] for c in containers]
    return dict(containers[0])


def _image_env(dockerfile: Path) -> dict[str, str]:
    """The ``ENV k=v ...`` lines of a Dockerfile: what the container starts with."""
    env: dict[str, str] = {}
    for line in dockerfile.read_text().splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def _settings(monkeypatch: pytest.MonkeyPatch, dockerfile: Path, container: Doc) -> Settings:
    """Settings as the server in this container parses them (literal env values only)."""
    with monkeypatch.context() as m:
        for key in [k for k in os.environ if k.startswith(PREFIX)]:
            m.delenv(key)
        for key, value in _image_env(dockerfile).items():
            m.setenv(key, value)
        for entry in container.get("env", []):
            if "value" in entry:
                m.setenv(entry["name"], str(entry["value"]))
        return Settings()


_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
          "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "": 1}


def _bytes(quantity: str | int) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]i|[kMGT]?)", str(quantity))
    assert m, f"cannot read the quantity {quantity!r}"
    return int(m.group(1)) * _UNITS[m.group(2)]


def _route_paths(routes: list[Any], prefix: str = "") -> set[str]:
    """Every path the app serves. FastAPI >= 0.165 keeps an included router as one
    entry (``original_router``) rather than copying its routes into ``app.routes``."""
    paths: set[str] = set()
    for route in routes:
        if getattr(route, "path", None) is not None:
            paths.add(prefix + route.path)
        inner = getattr(route, "original_router", None)
        if inner is not None:
            context = getattr(route, "include_context", None)
            paths |= _route_paths(inner.routes, prefix + getattr(context, "prefix", ""))
    return paths


# -- variants: the raw base always; what kubectl renders when it is installed ------------


def _render(directory: Path) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: rendered variants not checked")
    out = subprocess.run([kubectl, "kustomize", str(directory)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d is not None]


VARIANTS = {
    # name: (docs, Dockerfile the image is built from)
    "base": (lambda: _docs(K8S / "base"), ROOT / "docker" / "Dockerfile"),
    "cpu": (lambda: _render(K8S), ROOT / "docker" / "Dockerfile"),
    "gpu": (lambda: _render(K8S / "gpu"), ROOT / "docker" / "Dockerfile.cuda"),
}


@pytest.fixture(params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[str, list[Doc], Path]:
    load, dockerfile = VARIANTS[request.param]
    return request.param, load(), dockerfile


# -- every file -------------------------------------------------------------------


def test_every_yaml_loads_and_has_a_kind() -> None:
    files = _yaml_files()
    assert files, "no manifests under docker/k8s"
    for path in files:
        docs = _load(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert "kind" in doc and "apiVersion" in doc, f"{path}: {doc}"


def test_every_adamserve_env_var_is_a_setting() -> None:
    fields = set(Settings.model_fields)
    names = []
    for path in _yaml_files():
        for doc in _load(path):
            for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get(
                    "containers", []):
                names += [(path, e["name"]) for e in container.get("env", [])]
    assert any(n.startswith(PREFIX) for _, n in names)
    for path, name in names:
        if name.startswith(PREFIX):
            assert name[len(PREFIX):].lower() in fields, \
                f"{path.relative_to(ROOT)}: {name} is not a field of adamserve.cli.Settings"


def test_kustomizations_list_files_that_exist_and_every_manifest_is_listed() -> None:
    listed: set[Path] = set()
    for path in _yaml_files():
        if path.name != "kustomization.yaml":
            continue
        k = _load(path)[0]
        assert k["kind"] == "Kustomization"
        entries = list(k.get("resources", [])) + [p["path"] for p in k.get("patches", [])]
        assert entries, f"{path} lists nothing"
        for entry in entries:
            target = (path.parent / entry).resolve()
            assert target.exists(), f"{path.relative_to(ROOT)} lists {entry}, which does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file(), f"{target} has no kustomization"
            listed.add(target)
    orphans = [p for p in _yaml_files() if p.name != "kustomization.yaml" and p not in listed]
    assert not orphans, f"manifests no kustomization lists: {orphans}"


# -- the shards: StatefulSet and headless Service --------------------------------------


def test_headless_service_gives_each_shard_the_documented_name() -> None:
    docs = _docs(K8S / "base")
    sts, svc = _one(docs, "StatefulSet"), _one(docs, "Service")
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None", "the Service must be headless"
    # the addresses docs/kubernetes.md hands to a sharded client
    name = f"{sts['metadata']['name']}-0.{svc['metadata']['name']}."
    assert name in (ROOT / "docs" / "kubernetes.md").read_text()


def test_selectors_match_the_pod_labels() -> None:
    docs = _docs(K8S / "base")
    sts, svc = _one(docs, "StatefulSet"), _one(docs, "Service")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    selectors = [sts["spec"]["selector"]["matchLabels"], svc["spec"]["selector"]]
    selectors += [c["labelSelector"]["matchLabels"]
                  for c in sts["spec"]["template"]["spec"].get("topologySpreadConstraints", [])]
    for selector in selectors:
        assert selector and selector.items() <= labels.items(), (selector, labels)


def test_ports_are_the_ports_the_server_binds(
        variant: tuple[str, list[Doc], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _, docs, dockerfile = variant
    sts, svc = _one(docs, "StatefulSet"), _one(docs, "Service")
    container = _container(sts)
    s = _settings(monkeypatch, dockerfile, container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": s.grpc_port, "http": s.http_port, "flight": s.flight_port}
    assert s.host == "0.0.0.0", "other pods cannot reach a server bound to " + s.host
    for p in svc["spec"]["ports"]:
        target = p.get("targetPort", p["port"])
        assert target in ports or target in ports.values(), f"targetPort {target} is no port"
        # a headless Service resolves to the pod: its port must be the container's
        assert p["port"] == ports[p["name"]]


def test_data_dir_is_the_shards_own_volume(
        variant: tuple[str, list[Doc], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _, docs, dockerfile = variant
    sts = _one(docs, "StatefulSet")
    container = _container(sts)
    s = _settings(monkeypatch, dockerfile, container)
    assert s.data_dir is not None, "no data directory: checkpoints would be off"
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == s.data_dir]
    assert len(mounts) == 1, f"nothing is mounted at the data directory {s.data_dir}"
    assert mounts[0]["name"] in claims, "the data directory must be a volumeClaimTemplate"


def test_checkpoints_line_up_across_shards(
        variant: tuple[str, list[Doc], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _, docs, dockerfile = variant
    s = _settings(monkeypatch, dockerfile, _container(_one(docs, "StatefulSet")))
    assert s.checkpoint_every > 0
    # steps divisible by N are the same steps on every shard; a time interval is not
    assert s.checkpoint_interval == 0
    # an older checkpoint must survive for a restore to fall back on a common step
    assert s.keep_checkpoints >= 2


def test_state_cap_fits_the_memory(
        variant: tuple[str, list[Doc], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    name, docs, dockerfile = variant
    container = _container(_one(docs, "StatefulSet"))
    s = _settings(monkeypatch, dockerfile, container)
    if name == "gpu":
        # state lives on the GPU: the default cap (80% of its memory) applies
        assert s.max_state_bytes is None and s.device == "cuda"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        return
    # the CPU default is 80% of the node's memory, not of the container's limit
    limit = _bytes(container["resources"]["limits"]["memory"])
    assert s.max_state_bytes is not None and s.max_state_bytes < limit


def test_token_comes_from_an_optional_secret(variant: tuple[str, list[Doc], Path]) -> None:
    _, docs, _ = variant
    env = {e["name"]: e for e in _container(_one(docs, "StatefulSet"))["env"]}
    ref = env[PREFIX + "TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True


def test_grace_period_covers_the_sigterm_checkpoint() -> None:
    sts = _one(_docs(K8S / "base"), "StatefulSet")
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    grace = compose["services"]["adamserve"]["stop_grace_period"]
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= int(
        grace.removesuffix("s"))


def test_probes_are_open_routes_of_the_app(variant: tuple[str, list[Doc], Path]) -> None:
    _, docs, _ = variant
    container = _container(_one(docs, "StatefulSet"))
    probes = {k: container[k]["httpGet"] for k in
              ("startupProbe", "livenessProbe", "readinessProbe") if k in container}
    assert {"livenessProbe", "readinessProbe"} <= probes.keys()
    for probe in probes.values():
        assert probe["port"] in ("http", *[p["containerPort"] for p in container["ports"]
                                          if p["name"] == "http"])
    service = OptimizerService(SessionStore(CpuBackend(), None))
    # a token is set (from the Secret) but a kubelet sends none
    app = create_app(service, token="from-the-secret")
    routes = _route_paths(app.routes)
    assert "/v2/sessions" in routes, f"the route walk found too little: {routes}"
    for kind, probe in probes.items():
        assert probe["path"] in routes, f"{kind} {probe['path']} is not a route of the app"
    with TestClient(app) as client:
        # readiness waits for the sessions to be restored
        assert client.get(probes["readinessProbe"]["path"]).status_code == 503
        service.start()
        for kind, probe in probes.items():
            r = client.get(probe["path"])
            assert r.status_code == 200, f"{kind} {probe['path']}: {r.status_code} {r.text}"


# -- the GPU patch -----------------------------------------------------------------


def test_gpu_patch_requests_a_gpu_and_merges_into_the_base(
        monkeypatch: pytest.MonkeyPatch) -> None:
    base = _one(_docs(K8S / "base"), "StatefulSet")
    patch = _one(_docs(K8S / "gpu"), "StatefulSet")
    kustomization = _one(_docs(K8S / "gpu"), "Kustomization")
    assert patch["metadata"]["name"] == base["metadata"]["name"]
    base_container = _container(base)
    container = _container(patch)
    # containers merge by name: another name would add a second container
    assert container["name"] == base_container["name"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] in {i["name"] for i in kustomization["images"]}
    base_env = {e["name"] for e in base_container["env"]}
    for entry in container["env"]:
        if entry.get("$patch") == "delete":
            assert entry["name"] in base_env, f"deletes {entry['name']}, which the base lacks"
    s = _settings(monkeypatch, ROOT / "docker" / "Dockerfile.cuda", container)
    assert s.device == "cuda"
