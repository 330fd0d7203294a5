"""Suite-wide rules: no silent skips, and a run that collects nothing fails.

`make test` installs every tool and package the tests use, so a skip can
only mean breakage, except for tests that need a GPU: those carry the `cuda`
marker and may skip on a machine without one. Any other skip turns the run
red, as does a run that collected no test (pytest's exit code 5)."""

from __future__ import annotations

import pytest

_bad_skips: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "cuda" not in report.keywords:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _bad_skips.append(f"{report.nodeid}: {reason}")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    if not items and not config.option.collectonly:
        raise pytest.UsageError("no test was collected: a run that tests nothing is a failure")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _bad_skips and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _bad_skips:
        terminalreporter.section("skips that are failures (only `cuda`-marked tests may skip)", red=True)
        for line in _bad_skips:
            terminalreporter.line(line)
