"""The chaos suite's session summary: one verdict line per scenario and the table."""

from __future__ import annotations

from typing import Any

from .report import RESULTS, summary_lines, write_json


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    terminalreporter.section("chaos scenarios")
    for line in summary_lines(RESULTS):
        terminalreporter.write_line(line)
    path = write_json(RESULTS)
    if path is not None:
        terminalreporter.write_line(f"written to {path}")
