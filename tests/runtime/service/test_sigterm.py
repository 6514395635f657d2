"""SIGTERM during load: in-flight requests finish, new ones get 503, the process exits 0."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import httpx
import pytest

from runtime import contract as c


@pytest.mark.parametrize("engine_process", ["off", "on"])
def test_sigterm_drains_in_flight_and_refuses_new(server_factory, engine_process):
    with server_factory("--grace-period", "30", "--engine-process", engine_process) as srv:
        url = srv.url + c.COMPLETIONS_PATH
        req = {"prompt": "The order was placed", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        results: list[httpx.Response | Exception] = []

        def call() -> None:
            try:
                results.append(httpx.post(url, json=req, timeout=60))
            except Exception as exc:  # collected and asserted below
                results.append(exc)

        workers = [threading.Thread(target=call) for _ in range(8)]
        for w in workers:
            w.start()
        srv.wait_metric("moe_num_requests_running", lambda v: v >= 8, timeout=10)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        late = httpx.post(url, json=req, timeout=10)
        assert late.status_code == 503
        assert late.json()["error"]["code"] == "shutting_down"
        assert httpx.get(srv.url + c.READY_PATH, timeout=10).status_code == 503
        assert httpx.get(srv.url + c.HEALTH_PATH, timeout=10).status_code == 200
        for w in workers:
            w.join(60)
        assert len(results) == 8
        for r in results:
            assert isinstance(r, httpx.Response), r
            assert r.status_code == 200
            assert r.json()["usage"]["completion_tokens"] == 400
            assert r.json()["choices"][0]["finish_reason"] == "length"
        try:
            code = srv.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError("server did not exit after draining:\n" + srv.logs()) from None
        assert code == 0, srv.logs()
        assert "leaked" not in srv.logs()  # a clean exit tears down without native leak reports
        assert "Traceback" not in srv.logs()
