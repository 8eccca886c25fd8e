"""docker/: the images, compose and Kubernetes manifests, checked without a Docker engine.

The real linters run: hadolint on both Dockerfiles (with .hadolint.yaml), ``kubectl
kustomize`` to render docker/k8s and its GPU overlay, and kubernetes-validate to check what it
renders against Kubernetes' own schemas (strict: an unknown field fails). All three come with
the dev extra; a missing one fails the test, never skips it. Beside them, assertions on what
no linter knows: a non-root user, dependencies installed before the source is copied, every
install pinned by constraints.txt, writable volumes for all that the server writes.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
CONSTRAINTS = "constraints.txt"
# the Kubernetes release whose schemas the manifests are checked against (kubernetes-validate
# carries them; its version in pyproject.toml's dev extra is this one's)
KUBERNETES = "1.37.0"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]
Doc = dict[str, Any]

# image -> (Dockerfile, the extras it installs, kustomize directory that runs it)
IMAGES = {
    "adamserve": (DOCKER / "Dockerfile", "server", K8S),
    "adamserve-cuda": (DOCKER / "Dockerfile.cuda", "server,gpu", K8S / "gpu"),
}
INSTALL_THE_DEV_EXTRA = ("is not installed: install the dev extra "
                         "(`source scripts/_venv dev`, or pip install -c constraints.txt -e '.[dev]')")


def _tool(name: str) -> str:
    """A linter the dev extra installs into the venv's bin/ (next to this Python)."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.fail(f"{name} {INSTALL_THE_DEV_EXTRA}")
    return str(path)


# -- Dockerfiles -----------------------------------------------------------------------


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments left out."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        instr, _, args = (buf + line).partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, f"{dockerfile.name} ends inside a continued line"
    return out


def _env(dockerfile: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in _instructions(dockerfile):
        if instr == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def _uid(dockerfile: Path) -> int:
    users = [args for instr, args in _instructions(dockerfile) if instr == "USER"]
    assert users, f"{dockerfile.name} has no USER: it would run as root"
    user = users[-1].split(":")[0]
    # numeric: Kubernetes' runAsNonRoot cannot check a user name against the image
    assert user.isdigit(), f"{dockerfile.name}: USER {users[-1]} must be a numeric uid"
    assert int(user) != 0, f"{dockerfile.name} runs as root"
    return int(user)


def _pip_installs(dockerfile: Path) -> list[tuple[int, str]]:
    """(instruction index, command) for every pip install in a RUN."""
    found = []
    for i, (instr, args) in enumerate(_instructions(dockerfile)):
        if instr == "RUN":
            found += [(i, c.strip()) for c in re.split(r"&&|;", args) if "pip install" in c]
    return found


def test_hadolint_passes_both_dockerfiles() -> None:
    hadolint = _tool("hadolint")
    files = [str(d) for d, _, _ in IMAGES.values()]
    r = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), "--format", "json",
                        *files], capture_output=True, text=True, timeout=60, cwd=ROOT)
    findings = json.loads(r.stdout or "[]")
    assert not findings, "hadolint:\n" + "\n".join(
        f"{Path(f['file']).name}:{f['line']} {f['code']} {f['level']}: {f['message']}"
        for f in findings)
    assert r.returncode == 0, r.stderr
    # the same settings still catch a careless Dockerfile: the ignores are not everything
    bad = "FROM python:latest\nRUN cd /app && pip install numpy\n"
    r = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), "--format", "json",
                        "-"], input=bad, capture_output=True, text=True, timeout=60, cwd=ROOT)
    codes = {f["code"] for f in json.loads(r.stdout)}
    assert r.returncode != 0 and {"DL3007", "DL3003", "DL3013"} <= codes, codes


def test_every_hadolint_ignore_says_why() -> None:
    text = (ROOT / ".hadolint.yaml").read_text()
    ignored = yaml.safe_load(text).get("ignored", [])
    lines = text.splitlines()
    for code in ignored:
        at = next(i for i, line in enumerate(lines) if line.strip() == f"- {code}")
        assert at > 0 and lines[at - 1].strip().startswith("#"), \
            f".hadolint.yaml ignores {code} without a comment above it saying why"


@pytest.mark.parametrize("image", list(IMAGES))
def test_image_runs_as_a_numeric_non_root_user(image: str) -> None:
    dockerfile = IMAGES[image][0]
    instructions = [instr for instr, _ in _instructions(dockerfile)]
    _uid(dockerfile)
    last_user = len(instructions) - 1 - instructions[::-1].index("USER")
    # installs run as root, above the USER line; nothing after it runs as root
    assert "RUN" not in instructions[last_user:], f"{dockerfile.name}: a RUN after USER"


@pytest.mark.parametrize("image", list(IMAGES))
def test_image_has_a_healthcheck_on_readyz(image: str) -> None:
    dockerfile = IMAGES[image][0]
    checks = [args for instr, args in _instructions(dockerfile) if instr == "HEALTHCHECK"]
    assert len(checks) == 1, f"{dockerfile.name}: expected one HEALTHCHECK, found {checks}"
    assert "NONE" not in checks[0].split() and "/readyz" in checks[0], checks[0]
    # exec form, run by the venv's Python: no shell, no other interpreter needed
    command = json.loads(checks[0][checks[0].index("CMD") + 3:])
    assert command[0] == "/app/.venv/bin/python", command


@pytest.mark.parametrize("image", list(IMAGES))
def test_dependencies_are_a_layer_before_the_source(image: str) -> None:
    dockerfile, extras, _ = IMAGES[image]
    instructions = _instructions(dockerfile)
    copies = [(i, args.split()) for i, (instr, args) in enumerate(instructions) if instr == "COPY"]
    source = next(i for i, args in copies if args[0] == ".")
    first, first_args = copies[0]
    assert first < source and set(first_args[:-1]) == {"pyproject.toml", CONSTRAINTS}, \
        f"{dockerfile.name}: the first COPY must bring only pyproject.toml and {CONSTRAINTS}"
    installs = _pip_installs(dockerfile)
    before = [c for i, c in installs if first < i < source]
    after = [c for i, c in installs if i > source]
    assert before and after, f"{dockerfile.name}: no pip install before / after COPY . ."
    # the dependencies layer installs what pyproject.toml asks for: run its requirement
    # list (a python -c in the same RUN) here, on this pyproject.toml
    run = next(args for i, (instr, args) in enumerate(instructions)
               if instr == "RUN" and first < i < source and "tomllib" in args)
    words = shlex.split(run)
    script = words[words.index("-c") + 1]
    printed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                             text=True, check=True, timeout=60).stdout.split()
    expected = list(PROJECT["dependencies"])
    for extra in extras.split(","):
        expected += PROJECT["optional-dependencies"][extra]
    assert printed == expected
    # then the README's install, once the source is there
    assert any(f'-e ".[{extras}]"' in c for c in after), after
    readme = (ROOT / "README.md").read_text()
    assert f'pip install -e ".[{extras}]"' in readme or extras == "server"
    assert "-e \".[$extra]\"" in (ROOT / "scripts" / "_venv").read_text()


@pytest.mark.parametrize("image", list(IMAGES))
def test_every_install_is_pinned_by_the_constraints_file(image: str) -> None:
    dockerfile = IMAGES[image][0]
    for _, command in _pip_installs(dockerfile):
        assert f"-c {CONSTRAINTS}" in command, f"{dockerfile.name}: unpinned `{command}`"
        assert "--no-cache-dir" in command, f"{dockerfile.name}: pip's cache left in `{command}`"
    # and the tests' venv is made with the same file
    venv = (ROOT / "scripts" / "_venv").read_text()
    installs = [line for line in venv.splitlines() if "pip install" in line and "upgrade pip" not in line]
    assert installs and all(f"-c {CONSTRAINTS}" in line for line in installs), installs
    assert f"{CONSTRAINTS} -nt" in venv, "scripts/_venv must reinstall when the pins change"


@pytest.mark.parametrize("image", list(IMAGES))
def test_image_writes_only_to_its_volumes(image: str) -> None:
    dockerfile = IMAGES[image][0]
    instructions = _instructions(dockerfile)
    env = _env(dockerfile)
    volumes = [v for instr, args in instructions if instr == "VOLUME" for v in json.loads(args)]
    uid = _uid(dockerfile)
    made = " ".join(args for instr, args in instructions if instr == "RUN" and "install -d" in args)
    writes = [env["ADAMSERVE_DATA_DIR"], env["NUMBA_CACHE_DIR"]]
    if "gpu" in IMAGES[image][1]:
        writes.append(env["CUPY_CACHE_DIR"])
    for path in writes:
        assert any(Path(path).is_relative_to(v) for v in volumes), f"{path} is on no VOLUME"
        # made in the image, owned by the user: a new named volume copies it, owner and all
        assert f"-o {uid}" in made and path in made.split(), f"{path} is not made for uid {uid}"


def _docker_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore line as a regex: * and ? stay within one path element, ** spans any."""
    out = ""
    for part in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
        out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
    return re.compile(out)


def _ignored(path: str, patterns: list[re.Pattern[str]]) -> bool:
    parts = path.split("/")
    # a pattern that matches a directory leaves out all below it
    return any(p.fullmatch("/".join(parts[:n])) for p in patterns for n in range(1, len(parts) + 1))


def test_dockerignore_leaves_out_git_tests_and_caches() -> None:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    assert not [line for line in lines if line.startswith("!")], "re-includes are not checked here"
    patterns = [_docker_pattern(line) for line in lines]
    for path in [".git/HEAD", ".venv/bin/python", "tests/test_images.py", "data/LATEST",
                 "server/adamserve/__pycache__/cli.cpython-311.pyc", ".mypy_cache/3.11/x.json",
                 ".pytest_cache/v/cache", ".ruff_cache/CACHEDIR.TAG", ".hypothesis/examples/x",
                 "adamserve.egg-info/PKG-INFO", "tools/buf/node_modules/x"]:
        assert _ignored(path, patterns), f".dockerignore sends {path} to the build"
    # what the images COPY and install must stay in the context
    for path in ["pyproject.toml", CONSTRAINTS, "README.md", "scripts/serve", "scripts/_venv",
                 "server/adamserve/cli.py", "client/adamserve_client/__init__.py",
                 "protos/adamserve_proto/v2/optimizer.proto"]:
        assert (ROOT / path).exists(), path
        assert not _ignored(path, patterns), f".dockerignore leaves out {path}, which the image needs"


# -- constraints.txt -----------------------------------------------------------------


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / CONSTRAINTS).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{CONSTRAINTS}: {line!r} is not name==version"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_requirement_and_the_venv_has_those_versions() -> None:
    pins = _pins()
    assert "adamserve" not in pins, "the project itself must not be pinned"
    assert pins["torch"] == "2.13.0", "torch plain: ==2.13.0 takes the CPU wheel or PyPI's"
    requirements = list(PROJECT["dependencies"])
    for reqs in PROJECT["optional-dependencies"].values():
        requirements += reqs
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name == "adamserve":  # the dev extra's self-reference
            continue
        assert name in pins, f"{CONSTRAINTS} pins no version of {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (text, pins[name])
    # the tests run what the images ship: every pinned package installed here has the pin
    # (a local label, torch's +cpu, aside)
    for name, version in pins.items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue  # another extra's (CuPy)
        assert installed.public == version, \
            f"{name} {installed} is installed, {CONSTRAINTS} pins {version}: rerun scripts/_venv"


# -- compose -------------------------------------------------------------------------


def _compose() -> Doc:
    return dict(yaml.safe_load((DOCKER / "compose.yaml").read_text()))


def test_compose_cuda_profile_has_its_own_ports_and_volumes() -> None:
    compose = _compose()
    services = compose["services"]
    cpu, cuda = services["adamserve"], services["adamserve-cuda"]
    assert "profiles" not in cpu, "the CPU server starts without a profile"
    assert cuda["profiles"] == ["cuda"]
    host = {name: {p.split(":")[0] for p in s["ports"]} for name, s in services.items()}
    assert not host["adamserve"] & host["adamserve-cuda"], \
        f"both services bind host ports {host['adamserve'] & host['adamserve-cuda']}"
    named = {name: {v.split(":")[0] for v in s["volumes"]} for name, s in services.items()}
    assert not named["adamserve"] & named["adamserve-cuda"], "two servers on one data directory"
    for name, service in services.items():
        dockerfile = ROOT / service["build"]["dockerfile"]
        assert dockerfile == IMAGES[service["image"].split(":")[0]][0], name
        assert service["image"].endswith(f":{VERSION}"), f"{name}: {service['image']}"
        assert named[name] <= set(compose["volumes"]), f"{name}: undeclared volume"
        exposed = {int(p) for instr, args in _instructions(dockerfile) if instr == "EXPOSE"
                   for p in args.split()}
        assert {int(p.split(":")[1]) for p in service["ports"]} == exposed, name
        # read-only as on Kubernetes: everything the server writes is on a volume
        assert service["read_only"] is True, name
        env = _env(dockerfile) | {k: str(v) for k, v in service.get("environment", {}).items()}
        mounts = [v.split(":")[1] for v in service["volumes"]] + service.get("tmpfs", [])
        for key in ("ADAMSERVE_DATA_DIR", "NUMBA_CACHE_DIR"):
            assert any(Path(env[key]).is_relative_to(m) for m in mounts), f"{name}: {key}"


# -- Kubernetes ----------------------------------------------------------------------


def _render(directory: Path) -> list[Doc]:
    out = subprocess.run([_tool("kubectl"), "kustomize", str(directory)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {directory.relative_to(ROOT)}: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def _schema_error(doc: Doc) -> str:
    """What Kubernetes' schema for this kind refuses in doc, briefly; "" when it passes."""
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"kubernetes-validate {INSTALL_THE_DEV_EXTRA}")
    try:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        return f"{doc['kind']} {doc['metadata']['name']}: {where}: {e.message}"
    return ""


def _statefulset(docs: list[Doc]) -> Doc:
    found = [d for d in docs if d["kind"] == "StatefulSet"]
    assert len(found) == 1, [d["kind"] for d in docs]
    return found[0]


@pytest.fixture(scope="module", params=list(IMAGES))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    return request.param, _render(IMAGES[request.param][2])


def test_manifests_pass_kubernetes_schemas(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    assert {d["kind"] for d in docs} == {"StatefulSet", "Service"}
    errors = [e for e in map(_schema_error, docs) if e]
    assert not errors, "\n".join(errors)
    # strict: a misspelt field fails (the schema check is not one that passes anything)
    typo = copy.deepcopy(_statefulset(docs))
    typo["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFileSystem"] = True
    assert "'readOnlyRootFileSystem' was unexpected" in _schema_error(typo)


def test_raw_base_manifests_pass_kubernetes_schemas() -> None:
    for path in sorted((K8S / "base").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] != "Kustomization":
                assert not _schema_error(doc), f"{path.name}: {_schema_error(doc)}"


def test_pods_run_non_root_on_a_read_only_root_with_writable_volumes(
        rendered: tuple[str, list[Doc]]) -> None:
    image, docs = rendered
    dockerfile = IMAGES[image][0]
    sts = _statefulset(docs)
    pod = sts["spec"]["template"]["spec"]
    [container] = pod["containers"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == _uid(dockerfile), "the pod's uid is not the image's"
    assert security.get("fsGroup") == security["runAsGroup"], "the data volume needs fsGroup"
    own = container["securityContext"]
    assert own["readOnlyRootFilesystem"] is True, own
    assert own["allowPrivilegeEscalation"] is False, own
    assert own["capabilities"]["drop"] == ["ALL"], own
    # every path the server writes lies on a writable volume
    env = _env(dockerfile) | {e["name"]: e["value"] for e in container["env"] if "value" in e}
    writes = ["ADAMSERVE_DATA_DIR", "NUMBA_CACHE_DIR"] + (["CUPY_CACHE_DIR"] if "gpu" in
                                                           IMAGES[image][1] else [])
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for key in writes:
        path = Path(env[key])
        mount = next((m for p, m in mounts.items() if path.is_relative_to(p)), None)
        assert mount is not None, f"{key}={path} is on the read-only root filesystem"
        assert not mount.get("readOnly", False), f"{key}={path} is mounted read-only"
        assert mount["name"] in claims or "emptyDir" in volumes[mount["name"]], mount
    assert mounts[env["ADAMSERVE_DATA_DIR"]]["name"] in claims, "checkpoints must be on a claim"
    assert "/tmp" in mounts, "no writable /tmp"


def test_images_are_tagged_with_the_version(rendered: tuple[str, list[Doc]]) -> None:
    image, docs = rendered
    [container] = _statefulset(docs)["spec"]["template"]["spec"]["containers"]
    name, _, tag = container["image"].rpartition(":")
    assert name == image and tag == VERSION, f"{container['image']}: expected {image}:{VERSION}"
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    assert f"{image}:{VERSION}" in text, "docs/kubernetes.md builds another tag"
