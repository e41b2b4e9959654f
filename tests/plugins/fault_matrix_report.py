"""Prints the fault-injection matrix at the end of the pytest session.

``tests/test_fault_matrix.py`` attaches one row per run to its test report
(``user_properties`` named ``fault_matrix``); reports travel from xdist workers to the
controller, so this plugin sees every row wherever the test ran. ``tests/conftest.py`` loads
it through ``pytest_plugins``.
"""

from __future__ import annotations

from typing import Any

PROPERTY = "fault_matrix"
FAULTS = ("transient", "permanent")
WIDTHS = (19, 52, 44, 44)

_rows: list[dict[str, Any]] = []


def pytest_runtest_logreport(report: Any) -> None:
    if report.when != "call":
        return
    _rows.extend(value for name, value in report.user_properties if name == PROPERTY)


def cell(row: dict[str, Any]) -> str:
    """``failed ×4 1.2s ok`` — outcome, faults injected, seconds, invariants."""
    verdict = "ok" if not row["broken"] else "BROKEN " + ",".join(row["broken"])
    return f"{row['outcome']}{row['detail']} ×{row['injected']} {row['seconds']:.1f}s {verdict}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per (flow, call): the transient and the permanent fault side by side."""
    grid: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        grid.setdefault((row["flow"], row["call"]), {})[row["fault"]] = row
    header = ("flow", "call", "transient (2 faults each, then ok)", "permanent (every attempt)")
    lines = [
        " | ".join(h.ljust(w) for h, w in zip(header, WIDTHS, strict=True)),
        "-+-".join("-" * w for w in WIDTHS),
    ]
    for (flow, call), by_fault in sorted(grid.items()):
        if "clean" in by_fault:
            cells = [cell(by_fault["clean"]), ""]
        else:
            cells = [cell(by_fault[f]) if f in by_fault else "—" for f in FAULTS]
        lines.append(
            " | ".join(c.ljust(w) for c, w in zip((flow, call, *cells), WIDTHS, strict=True))
        )
    broken = [row for row in rows if row["broken"]]
    lines.append(f"{len(rows)} runs, {len(broken)} with broken invariants")
    for row in broken:
        for name, why in row["broken"].items():
            lines.append(f"  {row['flow']} / {row['call']} / {row['fault']}: {name}: {why}")
    return lines


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _rows:
        return
    terminalreporter.section("fault-injection matrix (issue 8)")
    for line in table(_rows):
        terminalreporter.write_line(line)
