"""`moefleet review ENV`: the quarterly review (model efficiency, hardware, service, quality, ROI and
rule-based recommendations) from the environment's Prometheus, written as review.md / .html / .json.

Where the metrics come from: an emulated environment (the embedded default) has its Prometheus on
loopback (the demo's); an AWS environment has its Amazon Managed Prometheus workspace, whose query URL
the stack outputs name, queried with SigV4-signed requests. ``--prometheus-url`` points at any other
Prometheus. Progress goes to stderr; the headline to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from infra.catalog.exit_codes import ExitCode
from infra.cli.common import CliError, Subparsers, add_environment_options, emulator_endpoint, environment


def add_review(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "review",
        help="quarterly review from the environment's Prometheus: efficiency, utilisation, SLOs, quality, ROI",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("env", help="environment name")
    parser.add_argument("--since", default="90d", help="length of the period before --until (default 90d)")
    parser.add_argument(
        "--until", help="end of the period: ISO 8601 (2026-03-31T00:00:00Z) or unix seconds (default: now)"
    )
    parser.add_argument("--step", default="5m", help="resolution of the series read (default 5m, the rules' window)")
    parser.add_argument("--out", type=Path, required=True, help="folder for review.md, review.html, review.json")
    parser.add_argument("--prometheus-url", help="Prometheus base URL (default: the environment's, see above)")
    parser.add_argument(
        "--model-config", type=Path, help="the served model's config.json (default: from the cold tier)"
    )
    parser.add_argument("--stack-dir", type=Path, help="where the stack was applied (default cdktf.out/stacks/ENV)")
    add_environment_options(parser)
    parser.set_defaults(handler=_review)


def parse_until(text: str | None) -> float:
    if text is None:
        return time.time()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(
            f"review: --until = {text!r}: expected ISO 8601 (2026-03-31T00:00:00Z) or unix seconds"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _review(args: argparse.Namespace) -> int:
    from infra.catalog.names import LOCAL_PROMETHEUS_URL
    from infra.catalog.outputs import OutputsError
    from infra.review import model_config, parse_duration, run
    from infra.review.analysis import Period
    from infra.review.prom import PrometheusClient, PrometheusError, amp_client
    from infra.review.render import headline_text
    from infra.terraform.outputs import default_stack_dir, read_stack_outputs

    env = environment(args, args.env)
    try:
        since = parse_duration(args.since, "--since")
        step = parse_duration(args.step, "--step")
    except ValueError as err:
        raise CliError(f"review: {err}") from None
    if step > since:
        raise CliError(f"review: --step = {args.step!r} is longer than --since = {args.since!r}; allowed: step ≤ since")
    end = parse_until(args.until)
    period = Period(end - since, end, step)

    outputs, outputs_error = None, None
    if args.prometheus_url is None or args.model_config is None:
        try:
            outputs = read_stack_outputs(args.stack_dir or default_stack_dir(env.name))
        except OutputsError as err:
            outputs_error = str(err)
    if args.prometheus_url:
        client = PrometheusClient(args.prometheus_url, progress=_progress)
    elif env.emulated:
        client = PrometheusClient(LOCAL_PROMETHEUS_URL, progress=_progress)
    elif outputs is None:
        raise CliError(f"review: the AMP query URL comes from the stack outputs: {outputs_error}")
    else:
        try:
            client = amp_client(outputs.amp_server_address, outputs.region, progress=_progress)
        except PrometheusError as err:
            raise CliError(f"review: {err}", ExitCode.FAILED) from None

    config, config_error = args.model_config, None
    if config is None and outputs is not None:
        try:
            endpoint = emulator_endpoint(args, env)
            dest = args.out / "model-config.json"
            config = model_config(env, outputs.models_bucket, outputs.models_prefix, endpoint, dest)
        except Exception as err:  # a missing config is "no data" in its section, never a failed review
            config_error = (
                f"config.json of {env.model.name}@{env.model.revision} not readable from the cold tier: {err}"
            )
    elif config is None:
        config_error = f"no --model-config and no stack outputs ({outputs_error})"

    _progress(f"review: {env.name}, {period.hours:,.1f} hours at {args.step} resolution from {client.base_url}")
    try:
        review, paths = run(env, client, period, args.out, config=config, config_error=config_error, progress=_progress)
    except PrometheusError as err:
        raise CliError(f"review: {err}", ExitCode.FAILED) from None
    except OSError as err:
        raise CliError(f"review: cannot write {args.out}: {err}", ExitCode.FAILED) from None
    except ModuleNotFoundError as err:  # the plots need matplotlib, part of the infra extra
        raise CliError(f"review: {err}; install the infra extra: pip install -e '.[infra]'", ExitCode.FAILED) from None
    print(headline_text(review))
    for rec in review.recommendations:
        if rec["fired"]:
            print(f"recommendation ({rec['rule']}): {rec['action']} — {rec['condition']}")
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return ExitCode.OK
