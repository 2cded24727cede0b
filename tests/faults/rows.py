"""One report row per fault case: what the harness measured and what the checks found."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.faults import scale
from tests.faults.checks import ImageCheck
from tests.faults.harness import Rig

ROOT = Path(__file__).resolve().parents[2]
ROWS = ROOT / "build" / "faults" / "rows"


@dataclass(frozen=True, slots=True)
class Row:
    case: str
    fault: str
    needs_recovery: bool
    scale: str
    detection_s: float | None
    repair_s: float | None
    held_s: float | None
    migrate_back_s: dict[str, float]
    loss_window_s: float | None
    lost_flushed_writes: int
    prefix: str
    prefix_ok: bool
    notes: list[str]


def row_of(
    name: str,
    fault: str,
    needs_recovery: bool,
    rig: Rig,
    checks: tuple[ImageCheck, ImageCheck | None],
) -> Row:
    final, midway = checks
    check = midway or final  # the window a fault could have cost: right after it
    prefix = final.describe()
    if midway is not None:
        prefix = f"after the repair {midway.describe()}; migrated back {final.describe()}"
    m = rig.measures
    errors = rig.g.disk.errors
    guest = "guest: no disk error"
    if errors:
        guest = f"guest: {len(errors)} disk errors ridden out (first: {errors[0].error[:100]})"
    return Row(
        case=name,
        fault=fault,
        needs_recovery=needs_recovery,
        scale=scale.describe(),
        detection_s=m.since_fault(m.detected_at),
        repair_s=m.since_fault(m.repaired_at),
        held_s=m.held_s,
        migrate_back_s=dict(m.back_s),
        loss_window_s=None if check.loss_window_s is None else round(check.loss_window_s, 2),
        lost_flushed_writes=final.lost_flushed + (midway.lost_flushed if midway else 0),
        prefix=prefix,
        prefix_ok=final.prefix_ok and (midway is None or midway.prefix_ok),
        notes=[*m.notes, guest],
    )


def write_row(row: Row) -> Path:
    ROWS.mkdir(parents=True, exist_ok=True)
    path = ROWS / f"{row.case}.json"
    path.write_text(json.dumps(asdict(row), indent=2) + "\n")
    return path
