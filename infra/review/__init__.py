"""`moefleet review`: the quarterly review the source document asks for, from an environment's Prometheus.

- :mod:`infra.review.prom` — PromQL over HTTP, SigV4-signed for Amazon Managed Prometheus;
- :mod:`infra.review.sparsity` — total against activated parameters from a DeepSeek config.json;
- :mod:`infra.review.analysis` — the queries and formulas, section by section, and the rules;
- :mod:`infra.review.render` — review.md, review.html (plots embedded) and review.json.

This module puts them together: :func:`prices` (from the cost module), :func:`model_config` (the served
revision's config.json from the cold tier), :func:`run` (query, analyse, write).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infra.catalog.environments import Environment
from infra.catalog.review_thresholds import ReviewThresholds
from infra.ops.cost import estimate
from infra.review.analysis import Inputs, Period, Prices, Review, analyse
from infra.review.prom import PrometheusClient
from infra.review.render import write
from infra.review.sparsity import ModelConfigError, Sparsity, load

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, what: str) -> float:
    """'90d', '12h', '5m' → seconds; anything else raises ValueError naming the option and what is allowed."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"{what} = {text!r}: expected a positive duration like 90d, 12h, 30m, 2w or 300s")
    return int(match.group(1)) * _UNITS[match.group(2)]


def prices(env: Environment) -> Prices:
    """Per GPU-hour and fixed hourly prices from `infra.ops.cost`: the lines that scale with the GPU pool
    (GPU nodes, their root volumes) spread over its GPUs; everything else runs whatever the traffic."""
    cost = estimate(env)
    it = env.gpu_instance_spec
    gpus = env.size_spec.gpu_nodes(env.gpu_instance_type) * it.gpus
    per_gpu = sum(line.usd_per_hour for line in cost.lines if line.scales_to_zero) / gpus
    fixed = sum(line.usd_per_hour for line in cost.lines if not line.scales_to_zero)
    return Prices(per_gpu, fixed, cost.source_capex_usd, cost.source_hardware, f"{it.name}, {it.gpu_model}")


def model_config(env: Environment, bucket: str, models_prefix: str, endpoint: str | None, dest: Path) -> Path:
    """Download the served revision's config.json from the cold tier to ``dest`` (kept next to the report,
    so the parameter counts can be checked later against the file they came from)."""
    from infra.ops.aws import make_client
    from infra.ops.weights import revision_prefix

    key = revision_prefix(models_prefix, env.model.name, env.model.revision) + "config.json"
    body = make_client("s3", env.region, endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(body)
    return dest


def sparsity_of(config: Path | None, error: str | None) -> tuple[Sparsity | None, str | None]:
    if config is None:
        return None, error or "no model config given"
    try:
        return load(config), None
    except ModelConfigError as err:
        return None, str(err)


def run(
    env: Environment,
    client: PrometheusClient,
    period: Period,
    out_dir: Path,
    *,
    config: Path | None,
    config_error: str | None = None,
    rules: ReviewThresholds | None = None,
    progress: Callable[[str], None],
) -> tuple[Review, dict[str, Path]]:
    """Query, analyse, write; returns the review and the paths of review.md / .html / .json."""
    sparsity, error = sparsity_of(config, config_error)
    inputs = Inputs(
        environment=env.name,
        size=env.size.value,
        model=f"{env.model.name}@{env.model.revision}",
        period=period,
        thresholds=env.thresholds,
        rules=rules or ReviewThresholds(),
        prices=prices(env),
        sparsity=sparsity,
        sparsity_error=error,
    )
    review = analyse(client, inputs, progress)
    progress("review: drawing plots and writing the report")
    return review, write(review, out_dir)


def headline(paths: dict[str, Path]) -> dict[str, Any]:
    return json.loads(paths["json"].read_text())["headline"]
