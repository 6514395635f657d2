"""Model weights in the cold tier (S3): upload, verify, pull into a hot-tier folder. boto3 + stdlib only.

Layout: `<models_prefix><model>/<revision>/<files>` plus `moefleet-manifest.json` (every file's path, size
and SHA-256). The manifest is written LAST: a revision without one is an interrupted upload, and neither
`pull` nor `verify` will take it as complete. Each object carries its SHA-256 in its metadata
(`x-amz-meta-sha256`), so a resumed upload skips what already arrived intact without downloading it.

The runtime image's init container runs this module directly, without the environments file:

    python -m infra.ops.weights pull --bucket B --prefix models/NAME/REV/ --dest /models/NAME/REV

Exit codes (`infra.catalog.exit_codes`, shared by every command): 0 ok, 1 AWS or local I/O error, 2 bad
input, 4 verification failed (checksum or size mismatch), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, TextIO

from infra.catalog.exit_codes import ExitCode
from infra.catalog.names import model_name_problem, model_revision_problem

MANIFEST_NAME = "moefleet-manifest.json"
MANIFEST_FORMAT = 1
#: Object metadata key (x-amz-meta-sha256) holding the object's SHA-256, hex.
SHA256_METADATA = "sha256"
DEFAULT_MODELS_PREFIX = "models/"
MIB = 1024 * 1024
#: Multipart from 64 MiB in 64 MiB parts; larger parts for very large files (S3 allows 10,000 parts).
PART_SIZE = 64 * MIB
MAX_PARTS = 9_000
#: Files transferred at once, and parts per file at once: 4 × 8 = 32 connections.
FILE_WORKERS = 4
PART_WORKERS = 8
HASH_BUFFER = 8 * MIB


class WeightsError(Exception):
    """Bad input or a state that stops the operation (missing folder, no manifest, conflicting revision)."""

    exit_code = ExitCode.BAD_INPUT


class VerificationError(WeightsError):
    """Objects or files do not match the manifest; `problems` lists each one."""

    exit_code = ExitCode.CHECK_FAILED

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message + ":\n  - " + "\n  - ".join(problems))
        self.problems = problems


# ---- progress ---------------------------------------------------------------------------------------


class Progress(Protocol):
    """What the core reports; the CLI draws rich bars, the init container prints lines."""

    def start(self, label: str, total_bytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def file_done(self, path: str, action: str) -> None: ...

    def finish(self) -> None: ...


class NullProgress:
    def start(self, label: str, total_bytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def file_done(self, path: str, action: str) -> None:
        pass

    def finish(self) -> None:
        pass


class LineProgress:
    """Plain lines for logs and pipes (no terminal control codes): one per file, one per 10% of bytes."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._label, self._total, self._done, self._shown = "", 0, 0, -1
        self._started = time.monotonic()

    def start(self, label: str, total_bytes: int) -> None:
        with self._lock:
            self._label, self._total, self._done, self._shown = label, total_bytes, 0, 0
            self._started = time.monotonic()
        self._print(f"{label}: {_human(total_bytes)}")

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
            tenth = int(10 * self._done / self._total) if self._total else 10
            if tenth == self._shown:
                return
            self._shown = tenth
            done, total, label = self._done, self._total, self._label
        self._print(f"{label}: {min(100, tenth * 10)}% ({_human(done)} of {_human(total)})")

    def file_done(self, path: str, action: str) -> None:
        self._print(f"  {action}: {path}")

    def finish(self) -> None:
        seconds = time.monotonic() - self._started
        rate = self._done / seconds / 1e6 if seconds > 0 else 0.0
        self._print(f"{self._label}: done, {_human(self._done)} in {seconds:.1f} s ({rate:.0f} MB/s)")

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


# ---- manifest ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    path: str  # POSIX, relative to the revision folder
    size: int
    sha256: str


@dataclass
class Manifest:
    model: str
    revision: str
    files: list[FileEntry]
    created: str = ""
    format: int = MANIFEST_FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def same_content(self, other: Manifest) -> bool:
        """Same files, sizes and checksums (creation time and ordering do not matter)."""
        return sorted(self.files, key=lambda f: f.path) == sorted(other.files, key=lambda f: f.path)

    def to_json(self) -> str:
        data = asdict(self)
        data["total_bytes"] = self.total_bytes
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Manifest:
        """Parse and check a manifest; paths must stay inside the folder (the init container writes them)."""
        try:
            data = json.loads(text)
            files = [FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in data["files"]]
            manifest = cls(str(data["model"]), str(data["revision"]), files, str(data.get("created", "")))
        except (ValueError, KeyError, TypeError) as err:
            raise WeightsError(f"{where}: not a valid weights manifest ({err})") from None
        for entry in files:
            _check_relative(entry.path, where)
            if not re.fullmatch(r"[0-9a-f]{64}", entry.sha256) or entry.size < 0:
                raise WeightsError(
                    f"{where}: bad entry for {entry.path!r} (size {entry.size}, sha256 {entry.sha256!r})"
                )
        return manifest


def _check_relative(path: str, where: str) -> None:
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path or path != pure.as_posix():
        raise WeightsError(f"{where}: file path {path!r} must be relative, POSIX, without '..'")


def revision_prefix(models_prefix: str, model: str, revision: str) -> str:
    """`models/<model>/<revision>/`, after checking both names (they become S3 keys and folder names)."""
    if problem := model_name_problem(model):
        raise WeightsError(f"--model {model!r}: {problem}")
    if problem := model_revision_problem(revision):
        raise WeightsError(f"--revision {revision!r}: {problem}")
    base = models_prefix if not models_prefix or models_prefix.endswith("/") else models_prefix + "/"
    return f"{base}{model}/{revision}/"


# ---- hashing ----------------------------------------------------------------------------------------


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_BUFFER):
            digest.update(chunk)  # releases the GIL: several files hash in parallel
            if on_bytes:
                on_bytes(len(chunk))
    return digest.hexdigest()


def scan_folder(folder: Path, progress: Progress | None = None, workers: int = FILE_WORKERS) -> list[FileEntry]:
    """Every regular file under `folder` with its size and SHA-256 (hashed in parallel)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"checkpoint folder {str(folder)!r}: not found or not a directory")
    # A folder filled by `pull` carries our manifest at its top: it describes the files, it is not one.
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST_NAME)
    if not paths:
        raise WeightsError(f"checkpoint folder {str(folder)!r}: holds no files")
    progress = progress or NullProgress()
    progress.start("hashing", sum(p.stat().st_size for p in paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(lambda p: sha256_file(p, progress.advance), paths))
    progress.finish()
    return [
        FileEntry(p.relative_to(folder).as_posix(), p.stat().st_size, d) for p, d in zip(paths, digests, strict=True)
    ]


def transfer_config(size: int) -> Any:
    """Multipart settings for one file: 64 MiB parts, larger when 9,000 parts would not cover it."""
    from boto3.s3.transfer import TransferConfig

    chunk = max(PART_SIZE, -(-size // MAX_PARTS))
    return TransferConfig(
        multipart_threshold=PART_SIZE, multipart_chunksize=chunk, max_concurrency=PART_WORKERS, use_threads=True
    )


# ---- S3 side ----------------------------------------------------------------------------------------


def read_manifest(s3: Any, bucket: str, prefix: str) -> Manifest | None:
    """The revision's manifest, or None when there is none (never uploaded, or the upload did not finish)."""
    key = prefix + MANIFEST_NAME
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as err:
        if _code(err) in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    return Manifest.from_json(body, f"s3://{bucket}/{key}")


def _remote_sha(s3: Any, bucket: str, key: str) -> tuple[int, str] | None:
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except Exception as err:
        if _code(err) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return int(head["ContentLength"]), (head.get("Metadata") or {}).get(SHA256_METADATA, "")


def _code(err: Exception) -> str:
    return str(((getattr(err, "response", None) or {}).get("Error") or {}).get("Code", ""))


@dataclass
class UploadReport:
    prefix: str
    manifest: Manifest
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    seconds: float = 0.0
    already_complete: bool = False


def upload(
    s3: Any,
    bucket: str,
    models_prefix: str,
    model: str,
    revision: str,
    folder: Path,
    *,
    progress: Progress | None = None,
    overwrite: bool = False,
    workers: int = FILE_WORKERS,
) -> UploadReport:
    """Upload a checkpoint folder; resumable, manifest last.

    A revision is immutable once its manifest exists: the same content again is a no-op, different
    content is refused unless `overwrite` (which removes the manifest first, so readers never see a mix).
    """
    progress = progress or NullProgress()
    prefix = revision_prefix(models_prefix, model, revision)
    started = time.monotonic()
    entries = scan_folder(folder, progress, workers)
    manifest = Manifest(model, revision, entries, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    report = UploadReport(prefix, manifest)
    existing = read_manifest(s3, bucket, prefix)
    if existing is not None:
        if existing.same_content(manifest):
            report.already_complete, report.skipped = True, [e.path for e in entries]
            report.seconds = time.monotonic() - started
            return report
        if not overwrite:
            raise WeightsError(
                f"s3://{bucket}/{prefix} already holds a complete revision with different files; revisions are "
                "immutable: upload under a new --revision (or pass --overwrite to replace it)"
            )
        s3.delete_object(Bucket=bucket, Key=prefix + MANIFEST_NAME)
    with ThreadPoolExecutor(max_workers=workers * 2) as pool:
        remote = list(pool.map(lambda e: _remote_sha(s3, bucket, prefix + e.path), entries))
    todo = []
    for entry, found in zip(entries, remote, strict=True):
        if found == (entry.size, entry.sha256):
            report.skipped.append(entry.path)
            progress.file_done(entry.path, "already uploaded")
        else:
            todo.append(entry)
    progress.start("uploading", sum(e.size for e in todo))
    folder = Path(folder)

    def send(entry: FileEntry) -> FileEntry:
        s3.upload_file(
            str(folder / entry.path),
            bucket,
            prefix + entry.path,
            ExtraArgs={"Metadata": {SHA256_METADATA: entry.sha256}},
            Config=transfer_config(entry.size),
            Callback=progress.advance,
        )
        return entry

    _run_all(todo, send, workers, lambda e: (report.uploaded.append(e.path), progress.file_done(e.path, "uploaded")))
    report.bytes_uploaded = sum(e.size for e in todo)
    body = manifest.to_json().encode()
    s3.put_object(
        Bucket=bucket,
        Key=prefix + MANIFEST_NAME,
        Body=body,
        ContentType="application/json",
        Metadata={SHA256_METADATA: hashlib.sha256(body).hexdigest()},
    )
    progress.finish()
    report.seconds = time.monotonic() - started
    return report


def _run_all(items: Iterable[FileEntry], work: Callable, workers: int, done: Callable[[FileEntry], Any]) -> None:
    """Run `work` over items in a pool; report each completion from this thread. On the first failure,
    cancel what has not started, let running transfers end, re-raise. On Ctrl-C, do not wait for them:
    the caller exits (an unfinished multipart upload is aborted by the bucket's lifecycle rule)."""
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(work, item) for item in items]
        for future in as_completed(futures):
            done(future.result())
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def verify(s3: Any, bucket: str, prefix: str, *, progress: Progress | None = None, deep: bool = True) -> Manifest:
    """Check every object against the manifest: present, same size, metadata checksum, and (deep) the
    SHA-256 of the bytes actually stored. Raises VerificationError listing every problem."""
    progress = progress or NullProgress()
    manifest = read_manifest(s3, bucket, prefix)
    if manifest is None:
        raise VerificationError(
            f"s3://{bucket}/{prefix}", [f"no {MANIFEST_NAME}: never uploaded, or the upload did not finish"]
        )
    progress.start("verifying", manifest.total_bytes if deep else 0)

    def check(entry: FileEntry) -> tuple[FileEntry, str | None]:
        key = prefix + entry.path
        found = _remote_sha(s3, bucket, key)
        if found is None:
            return entry, f"{entry.path}: missing"
        size, meta_sha = found
        if size != entry.size:
            return entry, f"{entry.path}: size {size} != manifest {entry.size}"
        if meta_sha != entry.sha256:
            return entry, f"{entry.path}: metadata sha256 {meta_sha or '(none)'} != manifest {entry.sha256}"
        if deep:
            digest = hashlib.sha256()
            for chunk in s3.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(HASH_BUFFER):
                digest.update(chunk)
                progress.advance(len(chunk))
            if digest.hexdigest() != entry.sha256:
                return entry, f"{entry.path}: stored bytes hash to {digest.hexdigest()}, manifest says {entry.sha256}"
        return entry, None

    problems: list[str] = []
    with ThreadPoolExecutor(max_workers=FILE_WORKERS) as pool:
        for entry, problem in pool.map(check, manifest.files):
            progress.file_done(entry.path, "CORRUPT" if problem else "ok")
            if problem:
                problems.append(problem)
    progress.finish()
    if problems:
        raise VerificationError(
            f"s3://{bucket}/{prefix}: {len(problems)} of {len(manifest.files)} file(s) bad", problems
        )
    return manifest


@dataclass
class PullReport:
    dest: Path
    manifest: Manifest
    downloaded: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    up_to_date: bool = False
    seconds: float = 0.0


def local_manifest(dest: Path) -> Manifest | None:
    path = Path(dest) / MANIFEST_NAME
    try:
        return Manifest.from_json(path.read_bytes(), str(path))
    except (FileNotFoundError, NotADirectoryError, WeightsError):
        return None


def _intact(path: Path, entry: FileEntry) -> bool:
    try:
        return path.is_file() and path.stat().st_size == entry.size and sha256_file(path) == entry.sha256
    except OSError:
        return False


def check_local(dest: Path, manifest: Manifest, workers: int = FILE_WORKERS) -> None:
    """Every file in `dest` has the manifest's size and SHA-256, or VerificationError naming each file that
    does not with both checksums. A hot tier that matched its manifest when pulled can still change later
    (a bad disk, an FSx restore, a process writing where it should not); serving from it would give wrong
    answers with no error anywhere."""

    def check(entry: FileEntry) -> str | None:
        path = dest / entry.path
        try:
            size = path.stat().st_size
            if size != entry.size:
                return f"{entry.path}: {size} bytes on the hot tier, manifest says {entry.size}"
            digest = sha256_file(path)
        except OSError as err:
            return f"{entry.path}: cannot read it on the hot tier ({err.strerror or err})"
        if digest != entry.sha256:
            return f"{entry.path}: sha256 {digest} on the hot tier, manifest says {entry.sha256}"
        return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = [p for p in pool.map(check, manifest.files) if p]
    if problems:
        raise VerificationError(
            f"{dest} no longer matches its manifest (changed after it was pulled); refusing to serve it. "
            f"To fetch the damaged files again, remove {dest / MANIFEST_NAME} and restart the pod "
            "(intact files are reused)",
            problems,
        )


def pull(
    s3: Any,
    bucket: str,
    prefix: str,
    dest: Path,
    *,
    progress: Progress | None = None,
    verify_local: bool = True,
) -> PullReport:
    """Make `dest` hold the revision at s3://bucket/prefix, atomically.

    Files are assembled in `.<dest>.partial` beside `dest` (same file system, so the final rename is
    atomic; an interrupted pull resumes from it), each checked against the manifest, files already in
    `dest` with the right checksum are linked rather than downloaded, the manifest is written last, then
    the folder replaces `dest`. A `dest` whose manifest already matches is left alone, after its files
    are checked against it (`verify_local`: every file hashed, see `check_local`).
    """
    progress = progress or NullProgress()
    started = time.monotonic()
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    manifest = read_manifest(s3, bucket, prefix)
    if manifest is None:
        raise WeightsError(
            f"s3://{bucket}/{prefix}{MANIFEST_NAME} not found: the revision was never uploaded, or its upload did "
            "not finish (the manifest is written last); check --bucket/--prefix or re-run the upload"
        )
    dest = Path(dest).absolute()
    report = PullReport(dest, manifest)
    current = local_manifest(dest)
    if current is not None and current.same_content(manifest):
        if verify_local:
            check_local(dest, manifest)
        report.up_to_date, report.reused = True, [e.path for e in manifest.files]
        report.seconds = time.monotonic() - started
        return report
    if dest.exists() and not dest.is_dir():
        raise WeightsError(f"--dest {str(dest)!r} exists and is not a directory")
    staging = dest.parent / f".{dest.name}.partial"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / MANIFEST_NAME).unlink(missing_ok=True)
    todo = []
    for entry in manifest.files:
        target = staging / entry.path
        if _intact(target, entry):
            report.reused.append(entry.path)
            continue
        existing = dest / entry.path
        if _intact(existing, entry):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            try:
                os.link(existing, target)
            except OSError:
                shutil.copy2(existing, target)
            report.reused.append(entry.path)
            progress.file_done(entry.path, "already present")
            continue
        todo.append(entry)
    progress.start("downloading", sum(e.size for e in todo))

    def fetch(entry: FileEntry) -> FileEntry:
        target = staging / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".download")
        s3.download_file(
            bucket, prefix + entry.path, str(part), Config=transfer_config(entry.size), Callback=progress.advance
        )
        digest = sha256_file(part)
        if digest != entry.sha256:
            part.unlink(missing_ok=True)
            raise VerificationError(
                f"s3://{bucket}/{prefix}",
                [f"{entry.path}: downloaded bytes hash to {digest}, manifest says {entry.sha256}"],
            )
        part.replace(target)
        return entry

    _run_all(
        todo,
        fetch,
        FILE_WORKERS,
        lambda e: (report.downloaded.append(e.path), progress.file_done(e.path, "downloaded")),
    )
    wanted = {e.path for e in manifest.files}
    for path in sorted(staging.rglob("*"), reverse=True):  # leftovers of another revision
        rel = path.relative_to(staging).as_posix()
        if path.is_file() and rel not in wanted:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    (staging / MANIFEST_NAME).write_text(manifest.to_json())
    _swap_into_place(staging, dest)
    progress.finish()
    report.seconds = time.monotonic() - started
    return report


def _swap_into_place(staging: Path, dest: Path) -> None:
    """rename(2) staging → dest. An existing dest is moved aside first and removed after; readers treat a
    folder without the manifest as incomplete, so the instant between the two renames is safe."""
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    try:
        if not dest.exists():
            staging.replace(dest)
            return
        dest.replace(old)
        staging.replace(dest)
    except OSError as err:  # e.g. EBUSY: dest is a mount point
        raise WeightsError(
            f"cannot move the pulled revision into {str(dest)!r} ({err.strerror}); pull into a folder inside the "
            f"volume, not its mount point (the verified files stay in {str(staging)!r} for the next try)"
        ) from None
    shutil.rmtree(old, ignore_errors=True)


# ---- entry point for the init container --------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from infra.ops.aws import make_client

    region = args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return make_client("s3", region, args.endpoint_url, max_pool=FILE_WORKERS * PART_WORKERS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infra.ops.weights",
        description="Model weights in the cold tier, without the environments file (init containers).",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bucket", required=True, help="cold-tier bucket (stack output models_bucket)")
    common.add_argument("--region", help="AWS region (default: $AWS_REGION)")
    common.add_argument("--endpoint-url", help="emulator URL (loopback); dummy credentials are used with it")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pull", parents=[common], help="sync a revision into a local folder, atomically")
    p.add_argument("--prefix", required=True, help="the revision's prefix, e.g. models/NAME/REV/")
    p.add_argument("--dest", required=True, type=Path, help="local folder (hot tier)")
    p.add_argument(
        "--no-verify-local",
        action="store_true",
        help="trust an up-to-date folder's files without hashing them (faster start, no corruption check)",
    )
    v = sub.add_parser("verify", parents=[common], help="recompute every object's SHA-256 against the manifest")
    v.add_argument("--prefix", required=True, help="the revision's prefix, e.g. models/NAME/REV/")
    u = sub.add_parser("upload", parents=[common], help="upload a checkpoint folder (manifest last)")
    u.add_argument("folder", type=Path)
    u.add_argument("--models-prefix", default=DEFAULT_MODELS_PREFIX)
    u.add_argument("--model", required=True)
    u.add_argument("--revision", required=True)
    u.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = LineProgress()
    try:
        s3 = _client(args)
        if args.command == "pull":
            report = pull(
                s3, args.bucket, args.prefix, args.dest, progress=progress, verify_local=not args.no_verify_local
            )
            state = "already up to date" if report.up_to_date else f"{len(report.downloaded)} downloaded"
            print(f"pull: {report.dest}: {state}, {len(report.reused)} reused")
        elif args.command == "verify":
            manifest = verify(s3, args.bucket, args.prefix, progress=progress)
            print(f"verify: s3://{args.bucket}/{args.prefix}: {len(manifest.files)} file(s) match the manifest")
        else:
            up = upload(
                s3, args.bucket, args.models_prefix, args.model, args.revision, args.folder,
                progress=progress, overwrite=args.overwrite,
            )  # fmt: skip
            print(f"upload: s3://{args.bucket}/{up.prefix}: {len(up.uploaded)} uploaded, {len(up.skipped)} skipped")
    except WeightsError as err:
        print(f"weights {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # disk full, permissions: one line in the init container's log
        print(f"weights {args.command}: {err}", file=sys.stderr)
        return ExitCode.FAILED
    except Exception as err:  # botocore errors: one line, not a traceback
        if type(err).__module__.startswith(("botocore", "boto3", "s3transfer")):
            from infra.ops.aws import credential_problem

            print(f"weights {args.command}: {credential_problem(err) or f'AWS error: {err}'}", file=sys.stderr)
            return ExitCode.FAILED
        raise
    return ExitCode.OK


def exit_now_on_interrupt(what: str) -> None:
    """After Ctrl-C: say how to resume, then leave at once (transfer threads are not waited for)."""
    print(f"{what}: interrupted; nothing is marked complete (no manifest written). Run the same command "
          "again to resume: finished files are skipped.", file=sys.stderr, flush=True)  # fmt: skip
    os._exit(ExitCode.INTERRUPTED)


if __name__ == "__main__":
    try:
        with contextlib.suppress(BrokenPipeError):
            sys.exit(main())
    except KeyboardInterrupt:
        exit_now_on_interrupt("weights")
