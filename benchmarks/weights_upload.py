"""Upload throughput of `moefleet weights upload` into the embedded AWS (moto on loopback).

    .venv/bin/python benchmarks/weights_upload.py [--size-mb 1024] [--files 4]

Writes a test checkpoint of random bytes (a few shards plus a config), starts its own emulator on a free
port, and prints MB/s for: hashing, the upload (parallel multipart, manifest last), a resumed upload
(everything skipped), a deep verify and a pull. The emulator is Python on the same cores as the client,
so the figures measure this machine's moto, not S3; they show the code is not the bottleneck, and catch
regressions (e.g. a serial upload). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.embedded.emulator.process import Emulator
from infra.ops import weights as w
from infra.ops.aws import make_client

MB = 1_000_000
T = TypeVar("T")


def make_checkpoint(folder: Path, size_mb: int, files: int) -> int:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "deepseek_v2"}')
    per_file = size_mb * MB // files
    block = os.urandom(16 * MB)  # random (incompressible) content, written fast by repeating a block
    for i in range(files):
        with open(folder / f"model-{i + 1:05d}-of-{files:05d}.safetensors", "wb") as fh:
            left = per_file
            while left > 0:
                chunk = block[: min(left, len(block))]
                fh.write(chunk[:-8] + i.to_bytes(4, "big") + left.to_bytes(4, "big"))  # no two blocks alike
                left -= len(chunk)
    return sum(p.stat().st_size for p in folder.iterdir())


def timed(label: str, nbytes: int, func: Callable[[], T]) -> T:
    start = time.monotonic()
    result = func()
    seconds = time.monotonic() - start
    print(f"{label:<28} {nbytes / MB:8.0f} MB {seconds:7.2f} s {nbytes / MB / seconds:8.1f} MB/s", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--files", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-weights-"))
    try:
        folder = work / "ckpt"
        total = make_checkpoint(folder, args.size_mb, args.files)
        print(f"checkpoint: {args.files} shards + config, {total / MB:.0f} MB; CPU cores: {os.cpu_count()}")
        with Emulator(log_path=work / "emulator.log") as url:
            s3 = make_client("s3", "us-east-1", url, max_pool=w.FILE_WORKERS * w.PART_WORKERS)
            s3.create_bucket(Bucket="bench-weights")
            timed("sha256 (parallel)", total, lambda: w.scan_folder(folder))
            report = timed(
                "upload (incl. hashing)", total, lambda: w.upload(s3, "bench-weights", "models/", "bench", "r1", folder)
            )
            assert len(report.uploaded) == args.files + 1
            w.read_manifest(s3, "bench-weights", "models/bench/r1/")
            s3.delete_object(Bucket="bench-weights", Key="models/bench/r1/" + w.MANIFEST_NAME)
            resumed = timed(
                "resume (all skipped)", total, lambda: w.upload(s3, "bench-weights", "models/", "bench", "r1", folder)
            )
            assert not resumed.uploaded
            timed("verify (deep)", total, lambda: w.verify(s3, "bench-weights", "models/bench/r1/"))
            timed("pull", total, lambda: w.pull(s3, "bench-weights", "models/bench/r1/", work / "dest"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
