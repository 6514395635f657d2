"""Run the embedded AWS: moto's WSGI app behind a thin middleware that serves what moto lacks.

    python -m infra.embedded.emulator.server --port 4566

Patches (each small, each needed by a resource the product really creates) are listed in `patches.py`
and docs/emulator.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

_CREDENTIAL = re.compile(r"Credential=[^/]+/\d{8}/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request")

WsgiApp = Callable[[dict[str, Any], Callable], Iterable[bytes]]


def _service_and_region(environ: dict[str, Any]) -> tuple[str | None, str]:
    m = _CREDENTIAL.search(environ.get("HTTP_AUTHORIZATION", ""))
    return (m["service"], m["region"]) if m else (None, "us-east-1")


class PatchedMoto:
    """WSGI middleware: requests moto cannot answer go to our handlers, the rest to moto."""

    def __init__(self, app: WsgiApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        from infra.embedded.emulator import amp_extras, ec2_extras, eks_extras, fsx_extras, ops_extras, patches

        path = environ.get("PATH_INFO", "")
        if path == "/moto-api/reset":
            eks_extras.reset()
            ec2_extras.reset()
            fsx_extras.reset()
            amp_extras.reset()
            ops_extras.reset()
            patches.reset()
            return self.app(environ, start_response)
        service, region = _service_and_region(environ)
        answered = ops_extras.dispatch(environ, start_response, service, region)
        if answered is not None:
            return answered
        if service == "eks":
            routed = eks_extras.match(path)
            if routed:
                return self._json(environ, start_response, routed, region, eks_extras)
            if patches.wants_eks_rewrite(path):
                return self._rewritten(environ, start_response, path, region, patches)
        if service == "aps":
            routed = amp_extras.match(path)
            if routed:
                return self._json(environ, start_response, routed, region, amp_extras)
            if patches.wants_amp_rewrite(path):
                return self._rewritten(environ, start_response, path, region, patches, service="aps")
        if service == "fsx":
            return self._fsx(environ, start_response, region, fsx_extras)
        if service == "s3" and "lifecycle" in environ.get("QUERY_STRING", ""):
            return self.app(environ, patches.lifecycle_header(environ, start_response))
        if service == "ec2" and environ.get("REQUEST_METHOD") == "POST":
            return self._ec2(environ, start_response, region, ec2_extras)
        return self.app(environ, start_response)

    def _ec2(self, environ, start_response, region, module) -> Iterable[bytes]:
        """EC2 query actions moto lacks; everything else is handed on with the body restored."""
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(raw)
        params = {k: v[-1] for k, v in parse_qs(raw.decode(), keep_blank_values=True).items()}
        action = params.get("Action")
        if action not in module.ACTIONS:
            return self.app(environ, start_response)
        try:
            status, data = "200 OK", module.handle(action, params, region).encode()
        except module.ApiError as err:
            status, data = "400 Bad Request", module.error_xml(err).encode()
        except KeyError as err:
            status, data = (
                "400 Bad Request",
                module.error_xml(module.ApiError("MissingParameter", str(err))).encode(),
            )
        start_response(status, [("Content-Type", "text/xml"), ("Content-Length", str(len(data)))])
        return [data]

    def _fsx(self, environ, start_response, region, module) -> Iterable[bytes]:
        """FSx: data repository associations served here; file-system answers completed (see fsx_extras)."""
        action = environ.get("HTTP_X_AMZ_TARGET", "").removeprefix(module.TARGET_PREFIX)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(raw)
        body = json.loads(raw) if raw else {}

        def reply(status: str, payload: dict) -> Iterable[bytes]:
            data = json.dumps(payload).encode()
            start_response(status, [("Content-Type", "application/x-amz-json-1.1"), ("Content-Length", str(len(data)))])
            return [data]

        if action in module.DRA_ACTIONS:
            try:
                return reply("200 OK", module.handle(action, region, body))
            except module.ApiError as err:
                return reply("400 Bad Request", {"__type": err.code, "message": err.message})
        if action not in ("CreateFileSystem", "DescribeFileSystems", "DeleteFileSystem"):
            return self.app(environ, start_response)
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list, exc_info: Any = None) -> Callable:
            captured["status"] = status
            return lambda data: None

        raw_out = b"".join(self.app(environ, capture))
        if not captured["status"].startswith("2"):
            start_response(captured["status"], [("Content-Length", str(len(raw_out)))])
            return [raw_out]
        payload = json.loads(raw_out)
        if action == "DeleteFileSystem":
            # Deleted at once in moto; answering "not found" makes the provider skip a wait that, against
            # moto, never polls again (see module docstring).
            fs_id = body.get("FileSystemId", "")
            return reply("400 Bad Request", {"__type": "FileSystemNotFound", "message": f"File system {fs_id} deleted"})
        if action == "CreateFileSystem":
            module.remember_create(region, body, payload)
            module.complete_file_system(region, payload["FileSystem"])
            return reply("200 OK", payload)
        missing = module.missing_file_systems(body.get("FileSystemIds") or [], payload.get("FileSystems") or [])
        if missing:
            return reply(
                "400 Bad Request", {"__type": "FileSystemNotFound", "message": f"File system {missing[0]} not found"}
            )
        for fs in payload.get("FileSystems") or []:
            module.complete_file_system(region, fs)
        return reply("200 OK", payload)

    def _rewritten(self, environ, start_response, path, region, patches, service="eks") -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(raw)
        if service == "eks":
            with contextlib.suppress(ValueError):
                patches.remember_request(path, environ["REQUEST_METHOD"], region, json.loads(raw) if raw else {})
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list, exc_info: Any = None) -> Callable:
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        body = b"".join(self.app(environ, capture))
        if captured["status"].startswith("2"):
            if service == "eks":
                body = patches.rewrite_body(path, region, body)
            else:
                body = patches.rewrite_amp_body(path, environ["REQUEST_METHOD"], region, raw, body)
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        start_response(captured["status"], [*headers, ("Content-Length", str(len(body)))])
        return [body]

    @staticmethod
    def _json(environ, start_response, routed, region, module) -> Iterable[bytes]:
        kind, params = routed
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
            status, payload = module.handle(kind, params, environ["REQUEST_METHOD"], region, body)
            data = json.dumps(payload).encode()
            headers = [("Content-Type", "application/json")]
        except module.ApiError as err:
            status, headers, data = module.error_body(err)
        except (KeyError, ValueError) as err:
            status, headers, data = module.error_body(module.ApiError(400, "InvalidParameterException", str(err)))
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict"}
        start_response(f"{status} {reason.get(status, 'Error')}", [*headers, ("Content-Length", str(len(data)))])
        return [data]


def make_app() -> WsgiApp:
    # IAM managed policies (AmazonEKSClusterPolicy & co.) must exist for policy attachments to apply.
    os.environ.setdefault("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    from infra.embedded.emulator.patches import apply_model_patches

    apply_model_patches()
    return PatchedMoto(DomainDispatcherApplication(create_backend_app))


def _exit_cleanly(*_: object) -> None:
    raise SystemExit(0)  # unwinds serve_forever(); shutdown() from the same thread would deadlock


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Embedded AWS (moto + MoE Fleet patches) on loopback")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4566)
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error(f"--host {args.host!r}: the emulator only listens on loopback")
    from moto.moto_server.threaded_moto_server import MotoRequestHandler
    from werkzeug.serving import make_server

    try:
        server = make_server(args.host, args.port, make_app(), threaded=True, request_handler=MotoRequestHandler)
    except OSError as err:
        sys.exit(f"emulator: cannot listen on {args.host}:{args.port}: {err.strerror}")
    signal.signal(signal.SIGTERM, _exit_cleanly)
    print(f"emulator: listening on http://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
