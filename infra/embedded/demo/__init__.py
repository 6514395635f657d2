"""`make demo`: the whole system on the embedded default, one command, no AWS account.

Steps (each named when it fails; everything started so far is torn down, in reverse order):
  1. start the embedded AWS (moto + our patches) on 127.0.0.1
  2. synthesize the `local` environment and `terraform apply` it with the real binary
  3. make a tiny DeepSeek-style checkpoint, upload it to the cold tier as the `local` environment's model
     (its `model` setting in environments.toml; `moefleet weights upload` code),
     pull it into a local hot-tier folder (`moefleet weights pull` code, as the init container does)
  4. start the runtime on the pulled weights and a local Prometheus with our rules and scrape config
  5. send streamed chat completions and risk predictions with feedback; ask Prometheus what it saw
  6. write a review of the run (`moefleet review` code) into the work folder and print its headline
  7. print a summary, stay up until Ctrl-C (or, with --once, go on at once), then tear everything down
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.catalog.environments import load_environments
from infra.catalog.names import LOCAL_PROMETHEUS_PORT
from infra.catalog.outputs import StackOutputs
from infra.catalog.sizes import ModelRef
from infra.embedded.emulator.process import Emulator, port_in_use
from infra.terraform.outputs import read_stack_outputs
from infra.terraform.runner import PROJECT_ROOT, Terraform, TerraformError
from runtime import contract

from .services import prometheus_process, runtime_process, runtime_ready_url

DEMO_ENV = "local"
DEFAULT_EMULATOR_PORT = 4566
DEFAULT_PROMETHEUS_PORT = LOCAL_PROMETHEUS_PORT
REQUIRED_TOOLS = {
    "terraform": "Terraform 1.11 (see README: requirements)",
    "prometheus": "Debian's prometheus package (`make setup` installs it)",
}


class StepFailed(RuntimeError):
    def __init__(self, step: str, cause: BaseException) -> None:
        super().__init__(f"step '{step}' failed: {cause}")
        self.step = step


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    started = time.monotonic()
    print(f"==> {name}", flush=True)
    try:
        yield
    except StepFailed:
        raise
    except Exception as err:  # every failure is reported as the step's, never as a traceback
        raise StepFailed(name, err) from err
    print(f"    done in {time.monotonic() - started:.1f} s", flush=True)


@dataclass(frozen=True)
class Ports:
    emulator: int
    runtime: int
    prometheus: int

    def check_free(self) -> None:
        """All ports are checked before anything starts, so a clash never leaves half a demo behind."""
        names = {"emulated AWS (--port)": self.emulator, "runtime": self.runtime, "Prometheus": self.prometheus}
        if len(set(names.values())) != len(names):
            raise StepFailed("check ports", ValueError(f"ports must differ: {names}"))
        for what, port in names.items():
            if port_in_use(port):
                raise StepFailed(
                    "check ports",
                    RuntimeError(
                        f"port {port} on 127.0.0.1 ({what}) is already in use; stop what holds it or pick another"
                    ),
                )


def check_tools() -> None:
    missing = [f"{tool} ({hint})" for tool, hint in REQUIRED_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise StepFailed("check tools", RuntimeError(f"not on PATH: {'; '.join(missing)}"))


def print_table(rows: dict[str, Any], indent: str = "    ") -> None:
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        print(f"{indent}{key:<{width}}  {shown}")


def demo_model() -> ModelRef:
    """The `local` environment's model setting in environments.toml: the name the tiny checkpoint is
    uploaded under, pulled from and served as."""
    return load_environments()[DEMO_ENV].model


def demo_runtime_env(outputs: StackOutputs, endpoint: str, model: ModelRef) -> dict[str, str]:
    """What the `local` environment's pods would get (its `runtime` table: baseline, risk task, …, and the
    stack's prediction table), with the emulated AWS as the DynamoDB endpoint: the demo's risk records go
    through the same DynamoDB code as on AWS."""
    from infra.ops.aws import EMULATED_CREDENTIALS

    return {
        **load_environments()[DEMO_ENV].runtime.env(),
        contract.ENV_MODEL_REVISION: model.revision,
        contract.ENV_RISK_STORE_TABLE: outputs.prediction_table,
        contract.ENV_RISK_STORE_ENDPOINT: endpoint,
        contract.ENV_AWS_REGION: outputs.region,
        "AWS_ACCESS_KEY_ID": EMULATED_CREDENTIALS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": EMULATED_CREDENTIALS["aws_secret_access_key"],
    }


def run(once: bool, ports: Ports, workdir: Path) -> int:
    check_tools()
    ports.check_free()
    model = demo_model()
    with contextlib.ExitStack() as teardown:
        workdir.mkdir(parents=True, exist_ok=True)
        emulator = Emulator(port=ports.emulator, log_path=workdir / "emulator.log")
        with step(f"start emulated AWS on 127.0.0.1:{ports.emulator}"):
            url = emulator.start()
        teardown.callback(_announce, "emulated AWS stopped", emulator.stop)

        with step(f"synthesize environment '{DEMO_ENV}'"):
            os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
            from stacks.app import build_app

            outdir = workdir / "cdktf.out"
            build_app(outdir, only=[DEMO_ENV], endpoint_override=url).synth()

        tf = Terraform.from_stack(outdir / "stacks" / DEMO_ENV, workdir / DEMO_ENV)
        with step("terraform init + apply (real terraform, emulated AWS)"):
            tf.init()
            teardown.callback(_destroy, tf)
            tf.apply()
        with step("read stack outputs"):
            outputs = read_stack_outputs(tf.workdir)

        model_dir = _weights(workdir, url, outputs, model)
        runtime_env = demo_runtime_env(outputs, url, model)
        api_key = secrets.token_urlsafe(32)
        runtime_url, prom_url = _services(teardown, workdir, model_dir, ports, model, runtime_env, api_key)
        started = time.time()  # the review's period: from the moment Prometheus watches the runtime
        results = _traffic(runtime_url, prom_url, model, api_key)
        with step("count the prediction records in the stack's DynamoDB table"):
            results["risk_records"] = _labelled_records(outputs, url)
        results["review"] = _review(prom_url, started, workdir)
        _summary(outputs, url, runtime_url, prom_url, results, workdir, api_key)

        if not once:
            print("\nEverything is up. Press Ctrl-C to destroy the stack and stop everything.", flush=True)
            _wait_for_interrupt()
        print("==> tearing down", flush=True)
    print("demo: finished, nothing left running", flush=True)
    return 0


def _weights(workdir: Path, endpoint: str, outputs: StackOutputs, model: ModelRef) -> Path:
    """Cold tier in, hot tier out: the path a real revision takes (docs/storage.md)."""
    import subprocess

    from infra.ops import weights
    from infra.ops.aws import make_client

    checkpoint = workdir / "checkpoint"
    with step("make a tiny DeepSeek-V2-style checkpoint (random weights)"):
        if checkpoint.exists():
            shutil.rmtree(checkpoint)
        subprocess.run(
            [sys.executable, "-m", "runtime.cli", "make-tiny", str(checkpoint)],
            check=True,
            capture_output=True,
            text=True,
        )
    s3 = make_client("s3", outputs.region, endpoint)
    bucket = outputs.models_bucket
    prefix = weights.revision_prefix(outputs.models_prefix, model.name, model.revision)
    with step(f"upload it to the cold tier: s3://{bucket}/{prefix}"):
        sent = weights.upload(s3, bucket, outputs.models_prefix, model.name, model.revision, checkpoint)
        print(
            f"    {len(sent.uploaded)} files, {sent.bytes_uploaded / 1e6:.1f} MB in {sent.seconds:.1f} s; "
            "SHA-256 manifest written last",
            flush=True,
        )
    hot = workdir / "hot-tier" / model.name / model.revision
    with step(f"pull it into the local hot tier: {hot}"):
        got = weights.pull(s3, bucket, prefix, hot)
        print(f"    {len(got.downloaded)} files verified against the manifest in {got.seconds:.1f} s", flush=True)
    return hot


def _services(
    teardown: contextlib.ExitStack,
    workdir: Path,
    model_dir: Path,
    ports: Ports,
    model: ModelRef,
    runtime_env: dict[str, str],
    api_key: str,
) -> tuple[str, str]:
    from infra.observability.alerts import alert_rules, rules_yaml
    from infra.observability.prometheus_config import write_local
    from infra.observability.recording import recording_rules_yaml

    runtime = runtime_process(model_dir, ports.runtime, workdir / "runtime.log", model.name, runtime_env, api_key)
    with step(f"start the runtime on 127.0.0.1:{ports.runtime} (CPU)"):
        runtime.start()
        teardown.callback(_announce, "runtime stopped", runtime.stop)
        took = runtime.wait_until_answers(runtime_ready_url(ports.runtime), timeout=300)
        print(f"    ready after {took:.1f} s (model loaded and warmed up)", flush=True)

    prom_dir = workdir / "prometheus"
    with step(f"start Prometheus on 127.0.0.1:{ports.prometheus} with our rules and scrape config"):
        # The demo has no GPU exporter; its "metrics missing" rule would only report that.
        rules = alert_rules(gpu_exporter=False)
        config = write_local(
            prom_dir,
            [f"127.0.0.1:{ports.runtime}"],
            rules_yaml(rules),
            scrape_interval="2s",
            evaluation_interval="2s",
            recording_rules_yaml=recording_rules_yaml(),
        )
        prometheus = prometheus_process(config, prom_dir / "data", ports.prometheus, workdir / "prometheus.log")
        prometheus.start()
        teardown.callback(_announce, "Prometheus stopped", prometheus.stop)
        prometheus.wait_until_answers(f"http://127.0.0.1:{ports.prometheus}/-/ready", timeout=60)
        print(f"    {len(rules)} alert rules loaded", flush=True)
    return f"http://127.0.0.1:{ports.runtime}", f"http://127.0.0.1:{ports.prometheus}"


def _traffic(runtime_url: str, prom_url: str, model: ModelRef, api_key: str) -> dict[str, Any]:
    from . import traffic

    results: dict[str, Any] = {}
    with step("send 16 streamed chat completions (4 at a time)"):
        chats = traffic.chat_load(runtime_url, api_key, model.name, requests=16, concurrency=4)
        if not all(c.chunks for c in chats):
            raise RuntimeError("a streamed completion returned no tokens")
        results["chats"] = chats
    with step("score 20 transactions on the risk endpoint and send their ground truth (records in DynamoDB)"):
        results["risk"] = traffic.risk_with_feedback(runtime_url, api_key, 20)
    with step("ask Prometheus what it scraped and how the alerts stand"):
        latency = contract.E2E_LATENCY.name
        served = traffic.prom_wait_for(
            prom_url, f"sum({latency}_count)", lambda v: v >= len(results["chats"]), timeout=30
        )
        if served is None:
            raise RuntimeError("Prometheus has no samples of the runtime's latency histogram")
        # Cumulative buckets since the runtime started (a rate() window would need two scrapes that
        # straddle the traffic, which a fast demo may not give).
        results["prometheus"] = {
            f"P{q}": traffic.prom_query(prom_url, f"histogram_quantile(0.{q}, sum by (le) ({latency}_bucket))")
            for q in (50, 99)
        }
        results["prometheus"]["requests seen"] = served
        results["alerts"] = traffic.prom_alert_states(prom_url)
    return results


#: Resolution of the demo's review: a few scrape intervals (the run lasts about a minute).
REVIEW_STEP_S = 4.0


def _review(prom_url: str, started: float, workdir: Path) -> dict[str, Any]:
    """The quarterly review over the demo's own run: the same code as `moefleet review local`, a period of
    a minute or two instead of 90 days; series the run has none of (GPUs on a CPU run) say "no data"."""
    from infra.review import run as run_review
    from infra.review.analysis import Period
    from infra.review.prom import PrometheusClient
    from infra.review.render import headline_text

    out = workdir / "review"
    with step(f"review the run (moefleet review): {out}"):
        end = time.time()
        period = Period(started, end, REVIEW_STEP_S)
        client = PrometheusClient(prom_url)
        review, paths = run_review(
            load_environments()[DEMO_ENV],
            client,
            period,
            out,
            config=workdir / "checkpoint" / "config.json",
            progress=lambda _message: None,
        )
        print(f"    {headline_text(review)}", flush=True)
    return {"headline": headline_text(review), "paths": paths}


def _labelled_records(outputs: StackOutputs, endpoint: str) -> int:
    """Records in the table that carry a ground-truth label (what feedback wrote, on any replica)."""
    from infra.ops.aws import make_client

    ddb = make_client("dynamodb", outputs.region, endpoint)
    page = ddb.scan(
        TableName=outputs.prediction_table,
        Select="COUNT",
        FilterExpression="attribute_exists(#label)",
        ExpressionAttributeNames={"#label": "label"},
    )
    return int(page["Count"])


def _summary(
    outputs: StackOutputs,
    aws_url: str,
    runtime_url: str,
    prom_url: str,
    results: dict[str, Any],
    workdir: Path,
    api_key: str,
) -> None:
    from .traffic import percentile

    print("\n======== MoE Fleet demo: summary ========")
    print("\nStack outputs (environment 'local', emulated AWS):")
    print_table(dict(sorted(outputs.to_mapping().items())))
    print("\nEndpoints:")
    print_table(
        {
            "emulated AWS": aws_url,
            "runtime (OpenAI API)": f"{runtime_url}/v1  — try {runtime_url}/docs",
            "runtime API key": f"{api_key}  — send 'Authorization: Bearer <key>' (generated for this run)",
            "runtime metrics": runtime_url + contract.METRICS_PATH,
            "Prometheus": f"{prom_url}  — alerts at {prom_url}/alerts",
            "state and logs": str(workdir),
        }
    )
    chats = results["chats"]
    print("\nSample answers (random weights, so the words are noise; the serving path is real):")
    for chat in chats[:2]:
        print(f"    Q: {chat.prompt}\n    A: {chat.text[:160]!r}")
    totals = [c.total_s * 1000 for c in chats]
    firsts = [c.first_token_s * 1000 for c in chats]
    prom = results["prometheus"]
    print(f"\nLatency of {len(chats)} streamed chat completions:")
    print_table(
        {
            "client P50 / P99 (end to end)": f"{percentile(totals, 50):.0f} ms / {percentile(totals, 99):.0f} ms",
            "client P50 time to first token": f"{percentile(firsts, 50):.0f} ms",
            "Prometheus P50 / P99 (histogram)": " / ".join(
                "n/a" if prom[k] is None else f"{prom[k] * 1000:.0f} ms" for k in ("P50", "P99")
            ),
            "requests Prometheus saw": f"{prom['requests seen']:.0f}",
        }
    )
    risk = results["risk"]
    print("\nRisk endpoint:")
    print_table(
        {
            "predictions": f"{risk.predictions} ({risk.flagged} flagged as fraud)",
            "rolling accuracy vs baseline": f"{risk.rolling_accuracy:.2f} vs {risk.baseline}",
            "labelled records in DynamoDB": f"{results['risk_records']} ({outputs.prediction_table})",
        }
    )
    print("\nAlerts (Prometheus's evaluation of our rules):")
    print_table(results["alerts"])
    print("\nReview of this run (moefleet review):")
    print_table({"headline": results["review"]["headline"], "report": str(results["review"]["paths"]["html"])})
    print("\nStop with Ctrl-C: the stack is destroyed and every process stopped.")


def _announce(message: str, action: Callable[[], None]) -> None:
    action()
    print(f"    {message}", flush=True)


def _destroy(tf: Terraform) -> None:
    try:
        tf.destroy()
        print("    stack destroyed", flush=True)
    except TerraformError as err:
        print(f"    destroy failed: {err}", file=sys.stderr, flush=True)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM tears down like Ctrl-C


def _wait_for_interrupt(sleep: Callable[[float], None] = time.sleep) -> None:
    # Explicit for SIGINT too: a shell that starts us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            sleep(3600)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="make demo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--once", action="store_true", help="run end to end, tear down and exit (for CI)")
    parser.add_argument("--port", type=int, default=DEFAULT_EMULATOR_PORT, help="emulated AWS port on 127.0.0.1")
    parser.add_argument("--runtime-port", type=int, default=contract.DEFAULT_PORT, help="runtime port on 127.0.0.1")
    parser.add_argument("--prometheus-port", type=int, default=DEFAULT_PROMETHEUS_PORT, help="Prometheus port")
    parser.add_argument("--workdir", type=Path, default=PROJECT_ROOT / ".demo", help="state and logs")
    args = parser.parse_args(argv)
    ports = Ports(args.port, args.runtime_port, args.prometheus_port)
    # SIGTERM during the run (not only while waiting) tears down like Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        sys.exit(run(args.once, ports, args.workdir))
    except StepFailed as err:
        print(f"demo: {err}\ndemo: everything started so far was torn down", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("demo: interrupted; everything started so far was torn down", file=sys.stderr)
        sys.exit(130)
