"""`moe-runtime serve` reads its per-environment settings from the variables the Kubernetes objects set
(runtime.contract): log level, accuracy baseline and window. CPU only, no model load."""

from __future__ import annotations

import pytest

from runtime import contract as c
from runtime.cli import build_parser, main


def _serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_defaults_without_the_variables(monkeypatch):
    for name in (c.ENV_LOG_LEVEL, c.ENV_ACCURACY_BASELINE, c.ENV_ACCURACY_WINDOW):
        monkeypatch.delenv(name, raising=False)
    args = _serve_args()
    assert (args.log_level, args.accuracy_baseline, args.accuracy_window) == (
        c.DEFAULT_LOG_LEVEL,
        None,
        c.DEFAULT_ACCURACY_WINDOW,
    )


def test_variables_set_the_defaults_and_flags_win(monkeypatch):
    monkeypatch.setenv(c.ENV_LOG_LEVEL, "DEBUG")
    monkeypatch.setenv(c.ENV_ACCURACY_BASELINE, "0.85")
    monkeypatch.setenv(c.ENV_ACCURACY_WINDOW, "200")
    args = _serve_args()
    assert (args.log_level, args.accuracy_baseline, args.accuracy_window) == ("debug", 0.85, 200)
    assert _serve_args("--log-level", "error").log_level == "error"


def test_unknown_log_level_in_the_environment_is_refused(monkeypatch, capsys):
    monkeypatch.setenv(c.ENV_LOG_LEVEL, "verbose")
    assert main(["serve", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert c.ENV_LOG_LEVEL in err and "verbose" in err and "debug, info, warning, error" in err


@pytest.mark.parametrize("level", c.LOG_LEVELS)
def test_serve_configures_logging_at_the_level(monkeypatch, level):
    import logging

    monkeypatch.setenv(c.ENV_LOG_LEVEL, level)
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, root.handlers[:]
    root.handlers = []  # basicConfig only acts on a root logger without handlers
    try:
        assert main(["serve", "--model", "/nonexistent"]) == 2  # stops at the missing checkpoint, after logging
        assert root.level == getattr(logging, level.upper())
    finally:
        root.handlers = saved_handlers
        root.setLevel(saved_level)


def test_gil_switch_interval_is_milliseconds_above_zero(capsys):
    from runtime.server.state import Settings

    assert _serve_args().gil_switch_interval_ms is None
    assert _serve_args("--gil-switch-interval-ms", "5").gil_switch_interval_ms == 5.0
    short = c.DEFAULT_GIL_SWITCH_INTERVAL_S
    assert Settings("m", device="cuda").switch_interval_s() == short  # a GPU engine thread beside the loop
    assert Settings("m", device="cuda", engine_process=True).switch_interval_s() is None
    assert Settings("m", device="cpu").switch_interval_s() is None
    assert Settings("m", device="cpu", gil_switch_interval_s=0.002).switch_interval_s() == 0.002
    for bad in ("0", "-1", "fast"):
        with pytest.raises(SystemExit):
            _serve_args("--gil-switch-interval-ms", bad)
        err = capsys.readouterr().err
        assert "--gil-switch-interval-ms" in err and f"expected a number > 0, got '{bad}'" in err
