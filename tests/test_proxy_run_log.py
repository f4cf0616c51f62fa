"""The sidecar's log lines wait for its banner (``trellis.proxy.run._HeldUntilBanner``)."""

from __future__ import annotations

import logging

from trellis.proxy.run import _HeldUntilBanner


class _Sink(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _record(level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord("trellis.proxy", level, __file__, 1, msg, None, None)


def test_info_waits_for_the_banner_and_keeps_its_order():
    sink = _Sink()
    held = _HeldUntilBanner(sink)
    held.handle(_record(logging.INFO, "one"))
    held.handle(_record(logging.INFO, "two"))
    assert sink.lines == []
    held.open_gate()
    assert sink.lines == ["one", "two"]
    held.handle(_record(logging.INFO, "three"))
    assert sink.lines == ["one", "two", "three"]


def test_a_warning_goes_out_at_once_after_what_came_before_it():
    sink = _Sink()
    held = _HeldUntilBanner(sink)
    held.handle(_record(logging.INFO, "starting"))
    held.handle(_record(logging.WARNING, "no control plane yet"))
    assert sink.lines == ["starting", "no control plane yet"]
    held.handle(_record(logging.INFO, "later"))
    assert sink.lines == ["starting", "no control plane yet"]


def test_what_is_held_is_bounded():
    sink = _Sink()
    held = _HeldUntilBanner(sink)
    for i in range(_HeldUntilBanner.CAPACITY + 5):
        held.handle(_record(logging.DEBUG, str(i)))
    assert len(sink.lines) == _HeldUntilBanner.CAPACITY
    assert len(held.held) == 5
