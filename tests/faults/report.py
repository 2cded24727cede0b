"""The fault suite's report: one row per case of tests/faults/cases.py, from build/faults/rows/.

    python -m tests.faults.report     # what ``make faults`` (and ``make bench``) prints

Writes build/faults/report.json (every row, the scale, the cases not run) and prints a
table. Columns: detection (fault to the first appliance heartbeat naming the
component failed; "-": never reported failed), repair (fault to the answer of the
first sync after it: an epoch cut after the fault committed on-prem), held (how long
the fault was held, scaled), migrate back per VM (the planned migrate back's request
to migrated_back; for recovery cases the fault to the VM landing on-prem; "-": none),
loss window (the guest's writing the on-prem image lacks, in its own time), lost
(acknowledged-and-flushed writes the image lacks: must be 0) and the prefix check.
Exit status 1 when a case that ran failed its checks.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from tests.faults import scale
from tests.faults.cases import CASES
from tests.faults.rows import ROOT, ROWS

REPORT = ROOT / "build" / "faults" / "report.json"
COLUMNS = ("case", "detect s", "repair s", "held s", "migrate back s", "loss s", "lost", "prefix")


def _seconds(value: object) -> str:
    return "-" if value is None else f"{float(str(value)):.2f}"


def _back(value: dict[str, float]) -> str:
    return ", ".join(f"{vm} {s:.2f}" for vm, s in value.items()) if value else "-"


def _cells(row: dict[str, Any]) -> tuple[str, ...]:
    return (
        row["case"],
        _seconds(row["detection_s"]),
        _seconds(row["repair_s"]),
        _seconds(row["held_s"]),
        _back(row["migrate_back_s"]),
        _seconds(row["loss_window_s"]),
        str(row["lost_flushed_writes"]),
        row["prefix"],
    )


def _missing(name: str, needs_recovery: bool) -> tuple[str, ...]:
    why = "not run (or failed early)"
    return (name, "", "", "", "", "", "", why)


def collect() -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(ROWS.glob("*.json")) if ROWS.is_dir() else []:
        row = json.loads(path.read_text())
        rows[row["case"]] = row
    cases = [{"case": c.name, "fault": c.fault, "needs_recovery": c.needs_recovery} for c in CASES]
    return {
        "scale": scale.SCALE,
        "scale_text": scale.describe(),
        "cases": cases,
        "rows": [rows[c.name] for c in CASES if c.name in rows],
        "not_run": [c.name for c in CASES if c.name not in rows],
    }


def table(report: dict[str, Any]) -> str:
    by_name = {row["case"]: row for row in report["rows"]}
    lines = [_cells(by_name[c.name]) if c.name in by_name else _missing(c.name, c.needs_recovery)
             for c in CASES]  # fmt: skip
    widths = [max(len(line[i]) for line in (COLUMNS, *lines)) for i in range(len(COLUMNS))]
    out = [f"Fault suite ({report['scale_text']})", ""]
    for line in (COLUMNS, *lines):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    out.append("")
    for row in report["rows"]:
        out.append(f"{row['case']}: {row['fault']}; {'; '.join(row['notes'])}")
    return "\n".join(out)


def main() -> int:
    report = collect()
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\n(written to {REPORT.relative_to(ROOT)})")
    failed = [r["case"] for r in report["rows"] if r["lost_flushed_writes"] or not r["prefix_ok"]]
    if failed:
        print(f"FAILED checks: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
