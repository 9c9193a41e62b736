from __future__ import annotations

import pytest

from tests.faults.harness import LANDED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The suite's count for issue 10: SIGKILLs that landed on a running stage, per test label."""
    if LANDED:
        per = ", ".join(f"{k} {v}" for k, v in LANDED.items())
        terminalreporter.write_line(f"fault injection: {sum(LANDED.values())} kills landed ({per})")
