"""Model weights in the cold tier, function level, against the shared moto server: upload (multipart,
manifest last, resumable), verify (detects a corrupted object), pull (atomic, skips what is there), and
the init container's entry point running without rich, pydantic or cdktf."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from infra.catalog.exit_codes import ExitCode
from infra.ops import weights as w
from infra.ops.aws import make_client

pytestmark = pytest.mark.moto
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def s3(emulator: str):
    return make_client("s3", "us-east-1", emulator, max_pool=32)


@pytest.fixture
def bucket(s3) -> str:
    name = f"ops-weights-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A small Hugging Face-style folder: config, two shards, a nested tokenizer file."""
    folder = tmp_path / "ckpt"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "deepseek_v2"}))
    (folder / "model-00001-of-00002.safetensors").write_bytes(os.urandom(300_000))
    (folder / "model-00002-of-00002.safetensors").write_bytes(os.urandom(200_000))
    (folder / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Crash(Exception):
    pass


class StopAfter(w.NullProgress):
    """Simulates a crash (the network, the machine) after `n` files have arrived."""

    def __init__(self, n: int) -> None:
        self.n, self.done = n, 0

    def file_done(self, path: str, action: str) -> None:
        if action == "uploaded":
            self.done += 1
            if self.done >= self.n:
                raise Crash


def test_upload_writes_objects_with_checksums_and_the_manifest(s3, bucket: str, checkpoint: Path) -> None:
    report = w.upload(s3, bucket, "models/", "org/Tiny-MoE", "r1", checkpoint)
    prefix = "models/org/Tiny-MoE/r1/"
    assert report.prefix == prefix
    assert sorted(report.uploaded) == sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*.*"))
    for entry in report.manifest.files:
        head = s3.head_object(Bucket=bucket, Key=prefix + entry.path)
        assert head["Metadata"]["sha256"] == _sha(checkpoint / entry.path) == entry.sha256
        assert head["ContentLength"] == entry.size
    stored = json.loads(s3.get_object(Bucket=bucket, Key=prefix + w.MANIFEST_NAME)["Body"].read())
    assert stored["model"] == "org/Tiny-MoE" and stored["revision"] == "r1"
    assert {f["path"]: f["sha256"] for f in stored["files"]} == {
        e.path: _sha(checkpoint / e.path) for e in report.manifest.files
    }
    assert stored["total_bytes"] == sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    again = w.upload(s3, bucket, "models/", "org/Tiny-MoE", "r1", checkpoint)
    assert again.already_complete and not again.uploaded


def test_large_files_go_up_in_parallel_multipart_parts(s3, bucket: str, tmp_path: Path) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "shard.safetensors").write_bytes(os.urandom(w.PART_SIZE + 1_000_000))
    w.upload(s3, bucket, "models/", "big", "r1", folder)
    head = s3.head_object(Bucket=bucket, Key="models/big/r1/shard.safetensors")
    assert head["ETag"].strip('"').endswith("-2"), "a multipart object's ETag ends in -<parts>"
    assert head["Metadata"]["sha256"] == _sha(folder / "shard.safetensors")
    assert w.verify(s3, bucket, "models/big/r1/").files[0].size == w.PART_SIZE + 1_000_000


def test_interrupted_upload_has_no_manifest_and_resumes(s3, bucket: str, checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(Crash):
        w.upload(s3, bucket, "models/", "resume", "r1", checkpoint, progress=StopAfter(1), workers=1)
    prefix = "models/resume/r1/"
    assert w.read_manifest(s3, bucket, prefix) is None, "a half-finished upload must not look complete"
    with pytest.raises(w.WeightsError, match="never uploaded, or its upload did not finish"):
        w.pull(s3, bucket, prefix, tmp_path / "dest")
    with pytest.raises(w.VerificationError, match=r"no moefleet-manifest\.json"):
        w.verify(s3, bucket, prefix)
    present = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    assert 1 <= len(present) < 4

    resumed = w.upload(s3, bucket, "models/", "resume", "r1", checkpoint)
    assert sorted(resumed.skipped) == sorted(k.removeprefix(prefix) for k in present)
    assert len(resumed.uploaded) == 4 - len(present)
    assert w.read_manifest(s3, bucket, prefix) is not None
    w.verify(s3, bucket, prefix)


def test_a_half_uploaded_object_is_sent_again(s3, bucket: str, checkpoint: Path) -> None:
    """An object whose metadata checksum does not match (e.g. a stale or foreign copy) is not skipped."""
    prefix = "models/stale/r1/"
    s3.put_object(Bucket=bucket, Key=prefix + "config.json", Body=b"{}", Metadata={"sha256": "0" * 64})
    report = w.upload(s3, bucket, "models/", "stale", "r1", checkpoint)
    assert "config.json" in report.uploaded
    w.verify(s3, bucket, prefix)


def test_verify_detects_a_corrupted_and_a_missing_object(s3, bucket: str, checkpoint: Path) -> None:
    w.upload(s3, bucket, "models/", "corrupt", "r1", checkpoint)
    prefix = "models/corrupt/r1/"
    key = prefix + "model-00002-of-00002.safetensors"
    meta = s3.head_object(Bucket=bucket, Key=key)["Metadata"]
    # Same size and the same metadata: only the stored bytes differ (bit rot, a bad copy).
    bad = bytearray((checkpoint / "model-00002-of-00002.safetensors").read_bytes())
    bad[1000] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(bad), Metadata=meta)
    assert w.verify(s3, bucket, prefix, deep=False), "a quick check sees only sizes and metadata"
    with pytest.raises(w.VerificationError) as caught:
        w.verify(s3, bucket, prefix)
    assert caught.value.exit_code == ExitCode.CHECK_FAILED
    assert len(caught.value.problems) == 1 and "model-00002-of-00002.safetensors" in caught.value.problems[0]
    s3.delete_object(Bucket=bucket, Key=prefix + "config.json")
    with pytest.raises(w.VerificationError) as caught:
        w.verify(s3, bucket, prefix)
    assert sorted(p.split(":")[0] for p in caught.value.problems) == [
        "config.json",
        "model-00002-of-00002.safetensors",
    ]


def test_changed_files_under_a_complete_revision_are_refused(s3, bucket: str, checkpoint: Path) -> None:
    w.upload(s3, bucket, "models/", "immutable", "r1", checkpoint)
    (checkpoint / "config.json").write_text('{"changed": true}')
    with pytest.raises(w.WeightsError, match="revisions are immutable"):
        w.upload(s3, bucket, "models/", "immutable", "r1", checkpoint)
    report = w.upload(s3, bucket, "models/", "immutable", "r1", checkpoint, overwrite=True)
    assert report.uploaded == ["config.json"]
    assert w.verify(s3, bucket, "models/immutable/r1/")


@pytest.mark.parametrize(
    ("model", "revision", "match"),
    [("../etc", "r1", "--model"), ("a/b/c", "r1", "--model"), ("ok", "has space", "--revision"), ("ok", "", "--rev")],
)
def test_bad_names_are_refused(s3, bucket: str, checkpoint: Path, model: str, revision: str, match: str) -> None:
    with pytest.raises(w.WeightsError, match=match):
        w.upload(s3, bucket, "models/", model, revision, checkpoint)


def test_missing_or_empty_folder_is_refused(s3, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(w.WeightsError, match="not found or not a directory"):
        w.upload(s3, bucket, "models/", "m", "r1", tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(w.WeightsError, match="holds no files"):
        w.upload(s3, bucket, "models/", "m", "r1", tmp_path / "empty")


def test_pull_is_atomic_verified_and_skips_what_is_there(s3, bucket: str, checkpoint: Path, tmp_path: Path) -> None:
    w.upload(s3, bucket, "models/", "pulled", "r1", checkpoint)
    prefix = "models/pulled/r1/"
    dest = tmp_path / "hot" / "pulled"
    first = w.pull(s3, bucket, prefix, dest)
    assert len(first.downloaded) == 4 and not first.reused
    for entry in first.manifest.files:
        assert _sha(dest / entry.path) == _sha(checkpoint / entry.path)
    assert (dest / w.MANIFEST_NAME).is_file()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["pulled"], "no staging or old folder left behind"

    assert w.pull(s3, bucket, prefix, dest).up_to_date

    (dest / "config.json").write_text("locally damaged")
    (dest / w.MANIFEST_NAME).unlink()
    second = w.pull(s3, bucket, prefix, dest)
    assert second.downloaded == ["config.json"]
    assert sorted(second.reused) == sorted(e.path for e in first.manifest.files if e.path != "config.json")
    assert _sha(dest / "config.json") == _sha(checkpoint / "config.json")


def test_pull_refuses_a_corrupted_object_and_keeps_the_old_folder(
    s3, bucket: str, checkpoint: Path, tmp_path: Path
) -> None:
    """A hot-tier folder holding r0 is replaced by r1 only when every r1 file checks out."""
    w.upload(s3, bucket, "models/", "rot", "r0", checkpoint)
    (checkpoint / "config.json").write_text('{"model_type": "deepseek_v3"}')
    w.upload(s3, bucket, "models/", "rot", "r1", checkpoint)
    dest = tmp_path / "rot"
    w.pull(s3, bucket, "models/rot/r0/", dest)
    before = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    key = "models/rot/r1/config.json"
    meta = s3.head_object(Bucket=bucket, Key=key)["Metadata"]
    s3.put_object(Bucket=bucket, Key=key, Body=b'{"model_type": "evil!!!!!!!!"}', Metadata=meta)
    with pytest.raises(w.VerificationError, match=r"config\.json: downloaded bytes hash to"):
        w.pull(s3, bucket, "models/rot/r1/", dest)
    assert {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    assert w.local_manifest(dest).revision == "r0"


def test_manifest_paths_cannot_leave_the_folder() -> None:
    evil = {"model": "m", "revision": "r", "files": [{"path": "../../etc/passwd", "size": 1, "sha256": "0" * 64}]}
    with pytest.raises(w.WeightsError, match="must be relative"):
        w.Manifest.from_json(json.dumps(evil), "test")
    with pytest.raises(w.WeightsError, match="not a valid weights manifest"):
        w.Manifest.from_json("{}", "test")


def test_init_container_entry_runs_with_boto3_and_stdlib_only(
    emulator: str, s3, bucket: str, checkpoint: Path, tmp_path: Path
) -> None:
    """`python -m infra.ops.weights pull` with rich, pydantic, cdktf, yaml and the rest of infra blocked;
    output is plain lines into a pipe."""
    w.upload(s3, bucket, "models/", "init", "r1", checkpoint)
    dest = tmp_path / "init-dest"
    blocked = ("rich", "pydantic", "cdktf", "constructs", "yaml", "infra.catalog.environments", "infra.catalog.sizes")
    blocked += ("infra.terraform",)
    code = (
        "import runpy, sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "sys.argv = ['weights'] + sys.argv[1:]\n"
        "runpy.run_module('infra.ops.weights', run_name='__main__')\n"
    )
    args = ["pull", "--bucket", bucket, "--prefix", "models/init/r1/", "--dest", str(dest)]
    env = {**os.environ, "AWS_REGION": "us-east-1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args, "--endpoint-url", emulator],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "4 downloaded" in proc.stdout
    assert "\x1b[" not in proc.stdout + proc.stderr
    assert "downloading: 100%" in proc.stderr
    assert _sha(dest / "config.json") == _sha(checkpoint / "config.json")
    proc = subprocess.run(
        [sys.executable, "-c", code, *args, "--endpoint-url", emulator],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0 and "already up to date" in proc.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "infra.ops.weights", "pull", "--bucket", bucket, "--prefix", "models/none/r1/",
         "--dest", str(tmp_path / "none"), "--endpoint-url", emulator],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 2
    assert "moefleet-manifest.json not found" in missing.stderr
