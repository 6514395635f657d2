"""Time and peak memory of synthesizing every environment in one process.

Baseline in the same run: a child process that only imports the provider bindings (the fixed cost every
synthesis pays: the binding package loads every submodule eagerly). Each measurement runs in a fresh child
so imports are not cached.
Goal: whole synthesis ≤ 20 s on the 2-core CPU box.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap

CHILD = textwrap.dedent(
    """
    import json, os, resource, sys, time
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
    t0 = time.perf_counter()
    import cdktf_cdktf_provider_aws.eks_cluster  # noqa: F401  (loads every submodule)
    t_import = time.perf_counter() - t0
    t_synth = 0.0
    if sys.argv[1] == "synth":
        from stacks.app import build_app
        t1 = time.perf_counter()
        build_app(sys.argv[2]).synth()
        t_synth = time.perf_counter() - t1
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    total = time.perf_counter() - t0
    print(json.dumps({"import_s": t_import, "synth_s": t_synth, "total_s": total, "peak_mib": peak_kib / 1024}))
    """
)


def measure(mode: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, "-c", CHILD, mode, out], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    baseline = measure("import")
    synth = measure("synth")
    print("| run | import bindings (s) | build + synth 4 stacks (s) | total (s) | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for name, row in (("baseline: import only", baseline), ("synthesize all environments", synth)):
        print(
            f"| {name} | {row['import_s']:.1f} | {row['synth_s']:.1f} | {row['total_s']:.1f} | {row['peak_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
