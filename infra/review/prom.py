"""PromQL over HTTP: a plain Prometheus (the embedded default's local one) or Amazon Managed Service for
Prometheus, whose query API wants every request SigV4-signed for the service ``aps``.

Queries are POSTed form-encoded (``/api/v1/query_range``), which both accept; a range longer than
Prometheus's 11,000-points-per-series limit is split into chunks and stitched back together. The standard
library does the HTTP; botocore (already an infra dependency) only signs.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Prometheus refuses range queries of more than 11,000 points per series; stay below it.
MAX_POINTS = 10_000
AMP_SERVICE = "aps"


class PrometheusError(RuntimeError):
    """The query API could not be reached or refused a query; the message names the URL and the query."""


@dataclass
class Series:
    labels: dict[str, str]
    #: {unix seconds: value}, evaluation timestamps of the range query.
    points: dict[float, float] = field(default_factory=dict)


class PrometheusClient:
    """Range and instant queries against ``base_url`` (the server's root, ending before ``api/v1``)."""

    def __init__(self, base_url: str, *, timeout: float = 120.0, progress: Callable[[str], None] | None = None):
        self.base_url = base_url.rstrip("/") + "/"
        self.timeout = timeout
        self.progress = progress or (lambda message: print(message, file=sys.stderr, flush=True))

    # ---- transport -------------------------------------------------------------------------------------

    def _headers(self, url: str, body: bytes) -> dict[str, str]:
        return {"Content-Type": "application/x-www-form-urlencoded"}

    def _post(self, path: str, params: dict[str, str]) -> Any:
        url = urllib.parse.urljoin(self.base_url, path)
        body = urllib.parse.urlencode(params).encode()
        request = urllib.request.Request(url, data=body, headers=self._headers(url, body), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:300]
            raise PrometheusError(f"{url}: HTTP {err.code} for {params.get('query')!r}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            raise PrometheusError(f"{url}: cannot reach the Prometheus query API ({err})") from None
        except json.JSONDecodeError:
            raise PrometheusError(f"{url}: the answer is not JSON") from None
        if payload.get("status") != "success":
            raise PrometheusError(
                f"{url}: {payload.get('errorType')}: {payload.get('error')} in {params.get('query')!r}"
            )
        return payload["data"]

    # ---- queries ---------------------------------------------------------------------------------------

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        """Every series of ``expr`` evaluated at start, start+step, … ≤ end, chunked under MAX_POINTS."""
        merged: dict[tuple, Series] = {}
        chunk = step * MAX_POINTS
        t = start
        while t <= end:
            stop = min(end, t + chunk - step)
            data = self._post(
                "api/v1/query_range", {"query": expr, "start": f"{t:.3f}", "end": f"{stop:.3f}", "step": f"{step:g}"}
            )
            for item in data.get("result", []):
                key = tuple(sorted(item["metric"].items()))
                series = merged.setdefault(key, Series(dict(item["metric"])))
                for ts, value in item.get("values", []):
                    series.points[float(ts)] = float(value)
            t = stop + step
        return list(merged.values())

    def query(self, expr: str, at: float) -> list[Series]:
        data = self._post("api/v1/query", {"query": expr, "time": f"{at:.3f}"})
        out = []
        for item in data.get("result", []) if data.get("resultType") == "vector" else []:
            ts, value = item["value"]
            out.append(Series(dict(item["metric"]), {float(ts): float(value)}))
        return out


class AmpClient(PrometheusClient):
    """The AMP workspace's query API, every request SigV4-signed (service ``aps``) with ``credentials``
    (botocore credentials: access key, secret key and, for temporary role credentials, a token)."""

    def __init__(self, base_url: str, region: str, credentials: Any, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self.region = region
        self.credentials = credentials

    def _headers(self, url: str, body: bytes) -> dict[str, str]:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(method="POST", url=url, data=body, headers=super()._headers(url, body))
        SigV4Auth(self.credentials, AMP_SERVICE, self.region).add_auth(request)
        return dict(request.headers.items())


def amp_client(base_url: str, region: str, **kwargs: Any) -> AmpClient:
    """An AMP client with the default credential chain (environment, profile, SSO, instance role)."""
    import boto3

    credentials = boto3.session.Session(region_name=region).get_credentials()
    if credentials is None:
        raise PrometheusError("AMP queries need AWS credentials; none found in the default credential chain")
    return AmpClient(base_url, region, credentials.get_frozen_credentials(), **kwargs)
