"""A weights file on the hot tier corrupted after it was pulled: the pod's init container, run with the
exact command the rendered objects give it, refuses to let the pod start and names the file and both
checksums (real files, real S3 API on the emulator, a real subprocess)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from infra.catalog.environments import DEFAULT_ENVIRONMENTS_FILE, load_environments
from infra.catalog.exit_codes import ExitCode
from infra.kube.objects import model_sync_container
from infra.ops import weights as w
from infra.ops.aws import make_client
from tests.infra.kube.inputs import make_input

pytestmark = pytest.mark.moto
ROOT = Path(__file__).resolve().parents[2]
SHARD = "model-00001-of-00001.safetensors"


def _init_command(bucket: str, prefix: str, dest: Path, endpoint: str) -> list[str]:
    """The rendered init container's command, pointed at this test's bucket, folder and emulator."""
    cmd = list(model_sync_container(make_input(load_environments(DEFAULT_ENVIRONMENTS_FILE)["dev"]))["command"])
    for flag, value in (("--bucket", bucket), ("--prefix", prefix), ("--dest", str(dest)), ("--region", "us-east-1")):
        cmd[cmd.index(flag) + 1] = value
    assert cmd[:3] == ["python", "-m", "infra.ops.weights"]
    return [sys.executable, *cmd[1:], "--endpoint-url", endpoint]


def test_init_container_refuses_a_hot_tier_file_changed_after_the_pull(emulator: str, tmp_path: Path) -> None:
    s3 = make_client("s3", "us-east-1", emulator)
    bucket = f"hot-rot-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "deepseek_v2"}')
    (ckpt / SHARD).write_bytes(os.urandom(256_000))
    w.upload(s3, bucket, "models/", "rot", "r1", ckpt)
    dest = tmp_path / "hot" / "rot" / "r1"
    cmd = _init_command(bucket, "models/rot/r1/", dest, emulator)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_REGION": "us-east-1"}

    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and "already up to date" in again.stdout  # intact: the pod starts

    good = hashlib.sha256((dest / SHARD).read_bytes()).hexdigest()
    with (dest / SHARD).open("r+b") as fh:  # one flipped byte, same size: only a hash can tell
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    bad = hashlib.sha256((dest / SHARD).read_bytes()).hexdigest()

    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == ExitCode.CHECK_FAILED, refused.stdout + refused.stderr
    assert f"{SHARD}: sha256 {bad} on the hot tier, manifest says {good}" in refused.stderr
    assert "refusing to serve it" in refused.stderr
    assert hashlib.sha256((dest / SHARD).read_bytes()).hexdigest() == bad, "nothing is silently rewritten"

    # the documented fix: drop the manifest, restart; only the damaged file is fetched again
    (dest / w.MANIFEST_NAME).unlink()
    fixed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert fixed.returncode == 0 and "1 downloaded, 1 reused" in fixed.stdout, fixed.stdout + fixed.stderr
    assert hashlib.sha256((dest / SHARD).read_bytes()).hexdigest() == good
