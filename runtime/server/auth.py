"""Bearer-key authentication and the request body size limit, as one ASGI middleware in front of the app.

Every route needs ``Authorization: Bearer <key>`` once keys are configured, except the probes and
``/metrics`` (:data:`runtime.contract.OPEN_PATHS`) and the API's own description (OpenAPI document and
its docs page): the kubelet's probes and Prometheus' scrapes carry no credentials, and none of these
answers holds request content or model output. Several keys may be valid at once so a key can be
rotated without downtime (add the new one, move the clients, drop the old one). The comparison runs
``hmac.compare_digest`` against every configured key, so the time taken says nothing about which key, or
how much of one, matched.

Bodies are counted as they arrive and refused with 413 past ``max_request_bytes``, before any JSON
parsing: a client cannot make the server buffer or parse an arbitrarily large document. Auth comes first,
so an unauthenticated client's body is never read at all.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from runtime import contract as c

log = logging.getLogger(__name__)

SCHEME = "Bearer"


class KeyFileError(ValueError):
    """The key file cannot be read or holds no key."""


def collect_keys(flags: Iterable[str] = (), files: Iterable[str] = (), env: str | None = None) -> tuple[str, ...]:
    """Every key from ``--api-key`` flags, ``--api-key-file`` files (one per line, ``#`` comments) and the
    comma-separated ``$MOE_API_KEYS``; blanks dropped, order kept, duplicates removed."""
    keys: list[str] = [k.strip() for k in flags]
    for f in files:
        try:
            text = Path(f).read_text()
        except OSError as exc:
            raise KeyFileError(f"--api-key-file {f}: cannot read it ({exc.strerror or exc})") from exc
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if not lines:
            raise KeyFileError(f"--api-key-file {f}: no key in it (one key per line)")
        keys += lines
    env = os.environ.get(c.ENV_API_KEYS) if env is None else env
    keys += [k.strip() for k in (env or "").split(",")]
    return tuple(dict.fromkeys(k for k in keys if k))


def key_matches(given: str, keys: Iterable[str]) -> bool:
    """Constant-time over all keys: no early exit, so timing leaks neither which key nor a prefix."""
    got = given.encode()
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(got, k.encode())
    return ok


def _error(status: int, message: str, type_: str, code: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


def warn_if_open(keys: tuple[str, ...]) -> None:
    """Called once at start-up: an open API is allowed (local runs, tests) but never silent."""
    if not keys:
        log.warning(
            "no API key configured (--api-key, --api-key-file or $%s): every route is open to anyone "
            "who can reach this port",
            c.ENV_API_KEYS,
        )


class GuardMiddleware:
    """ASGI middleware: 401 without a valid key on a protected path; 413 for a body over the limit."""

    def __init__(
        self, app, keys: tuple[str, ...], max_request_bytes: int, open_paths=c.OPEN_PATHS, on_reject=None
    ) -> None:
        self.app, self.keys, self.max_bytes = app, tuple(keys), max_request_bytes
        self.open_paths = frozenset(open_paths)
        self.on_reject = on_reject  # callback(reason) for the rejection counter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.keys and scope["path"] not in self.open_paths and not self._authorized(scope):
            if self.on_reject:
                self.on_reject("unauthorized")
            body = _error(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                "invalid_request_error",
                "invalid_api_key",
            )
            return await _respond(send, 401, body, [(b"www-authenticate", f'{SCHEME} realm="moe-fleet"'.encode())])
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await self._too_large(send, declared)
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE") and not declared:
            return await self.app(scope, receive, send)
        # Buffer the body up to the limit (chunked uploads declare no length), then replay it.
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(send, None)
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == SCHEME.lower() and key_matches(token.strip(), self.keys)
        return False

    async def _too_large(self, send, declared: int | None) -> None:
        if self.on_reject:
            self.on_reject("too_large")
        got = f"{declared} bytes" if declared is not None else "more than that"
        body = _error(
            413,
            f"request body is {got}; the limit is {self.max_bytes} bytes (serve --max-request-bytes)",
            "invalid_request_error",
            "request_too_large",
            "body",
        )
        await _respond(send, 413, body, [(b"connection", b"close")])


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _respond(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
