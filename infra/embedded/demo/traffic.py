"""What the demo sends and asks: streamed chat completions, risk predictions with feedback, and Prometheus
queries. Standard library only (urllib), so the demo needs nothing the `infra` extra does not carry."""

from __future__ import annotations

import json
import random
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from runtime import contract

PROMPTS = (
    "Summarise why mixture-of-experts models activate only a few experts per token.",
    "Is this card transaction suspicious: 3 purchases abroad within 10 minutes?",
    "Explain the KV cache in one sentence.",
    "What does a P99 latency alert tell an on-call engineer?",
)


def _post(url: str, body: dict[str, Any], api_key: str, timeout: float = 120) -> Any:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    return urllib.request.urlopen(request, timeout=timeout)


@dataclass(frozen=True)
class ChatResult:
    prompt: str
    text: str
    chunks: int
    first_token_s: float
    total_s: float


def chat_streamed(base_url: str, api_key: str, model: str, prompt: str, max_tokens: int = 24) -> ChatResult:
    """One streamed chat completion read as server-sent events, timed like a client sees it."""
    started = time.monotonic()
    first = None
    parts: list[str] = []
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "stream": True,
    }
    with _post(base_url + contract.CHAT_COMPLETIONS_PATH, body, api_key) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                break
            delta = json.loads(data)["choices"][0].get("delta", {}).get("content")
            if delta:
                first = first if first is not None else time.monotonic() - started
                parts.append(delta)
    total = time.monotonic() - started
    return ChatResult(prompt, "".join(parts), len(parts), first if first is not None else total, total)


def chat_load(base_url: str, api_key: str, model: str, requests: int, concurrency: int) -> list[ChatResult]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda p: chat_streamed(base_url, api_key, model, p), prompts))


@dataclass(frozen=True)
class RiskRound:
    predictions: int
    flagged: int
    rolling_accuracy: float
    baseline: float | None


def risk_with_feedback(base_url: str, api_key: str, count: int, rng_seed: int = 7) -> RiskRound:
    """Score `count` synthetic transactions, then report ground truth for each (the accuracy-drift input)."""
    rng = random.Random(rng_seed)
    flagged = 0
    last: dict[str, Any] = {}
    for i in range(count):
        features = {
            "amount": round(rng.lognormvariate(4, 1.2), 2),
            "country": rng.choice(["DE", "US", "SG", "BR"]),
            "card_present": rng.random() < 0.6,
            "hour": rng.randrange(24),
        }
        ask = {"features": features, "request_id": f"demo-{rng_seed}-{i}"}
        with _post(base_url + contract.RISK_PATH, ask, api_key) as r:
            prediction = json.load(r)
        flagged += prediction["label"] == "fraud"
        truth = (features["amount"] > 150 and not features["card_present"]) or features["hour"] < 4
        label = {"request_id": prediction["request_id"], "label": truth}
        with _post(base_url + contract.FEEDBACK_PATH, label, api_key) as r:
            last = json.load(r)
    return RiskRound(count, flagged, last.get("rolling_accuracy", float("nan")), last.get("baseline"))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (what a client-side load tool reports)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# ---- Prometheus ---------------------------------------------------------------------------------------


def prom_query(prom_url: str, expr: str) -> float | None:
    url = f"{prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        result = json.load(response)["data"]["result"]
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if value != value else value  # NaN: no observations in the window


def prom_alert_states(prom_url: str) -> dict[str, str]:
    """Every alerting rule's state as Prometheus evaluates it: inactive, pending or firing."""
    with urllib.request.urlopen(f"{prom_url}/api/v1/rules?type=alert", timeout=10) as response:
        groups = json.load(response)["data"]["groups"]
    return {rule["name"]: rule["state"] for group in groups for rule in group["rules"]}


def prom_wait_for(prom_url: str, expr: str, predicate, timeout: float) -> float | None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = prom_query(prom_url, expr)
        if value is not None and predicate(value):
            return value
        time.sleep(0.5)
    return value
