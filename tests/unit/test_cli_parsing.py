"""The ferry CLI's parsing: human units, policy and limits, selectors, migrate's bulk options,
and how migrations in the cloud and refusals are shown."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from rich.console import Console

from clients.cli import parser, refusal
from clients.client import FerryError
from clients.cloud import parse_limits, policy_body, selector
from clients.migrate import ProgressBoard, clone_request, migrations_table, rpo_text, settled
from clients.units import format_duration, human_size, parse_duration, parse_size
from messages.commands import VmRef
from messages.common import BulkTransferMode, MigrationState, MigrationType, Phase
from messages.errors import ErrorCode
from messages.events import ErrorResponse, ErrorResponseBody, MigrationStatus
from messages.keys import ApplianceKeyPair

KEY = ApplianceKeyPair.generate().public


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45", 45), ("90s", 90), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("1.5h", 5400),
     ("2d", 172800), (" 20M ", 1200)],
)  # fmt: skip
def test_durations_in_human_units(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "10x", "1.5s", "10 m", "-5m", "m10"])
def test_a_duration_that_does_not_parse_is_an_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration|seconds"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("4096B", 4096), ("1K", 1024), ("1.5K", 1536), ("512M", 512 * 2**20),
     ("10G", 10 * 2**30), ("10g", 10 * 2**30), ("10GiB", 10 * 2**30), ("10GB", 10 * 10**9),
     ("2T", 2 * 2**40), ("1TB", 10**12)],
)  # fmt: skip
def test_sizes_in_human_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "10Gb", "10iB", "10X", "1.3B", "-1G", "10 GG"])
def test_a_size_that_does_not_parse_is_an_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|bytes"):
        parse_size(text)


def test_sizes_and_durations_read_back() -> None:
    assert [human_size(n) for n in (100, 1536, 10 * 2**30)] == ["100B", "1.5K", "10G"]
    assert [format_duration(s) for s in (42.4, 725, 12000)] == ["42s", "12m05s", "3h20m"]


def test_policy_set_parses_its_units_and_limits() -> None:
    args = parser().parse_args(
        ["policy", "set", "--cluster", "lab", "--rto", "10m", "--rpo-bytes", "10G",
         "--limits", "cold=6,in-progress=3,resting=12", "--bandwidth-mbps", "250"]
    )  # fmt: skip
    body = policy_body(args)
    assert body.cluster == "lab"
    assert body.rto_rpo_interval_s == 600 and body.rpo_dirty_bytes == 10 * 2**30
    assert body.max_concurrent_migrations == 6
    assert body.max_in_progress_per_cache_node == 3
    assert body.max_resting_per_cache_node == 12
    assert body.bandwidth_cap_mbps == 250.0
    default = policy_body(parser().parse_args(["policy", "set", "--rto", "90s"]))
    assert default.cluster is None and default.rto_rpo_interval_s == 90
    assert default.rpo_dirty_bytes is None and default.max_concurrent_migrations is None


@pytest.mark.parametrize("text", ["cold", "cold=", "warm=3", "cold=x", "cold=3;resting=2"])
def test_limits_that_do_not_parse_name_what_is_wrong(text: str) -> None:
    with pytest.raises(ValueError, match="--limits"):
        parse_limits(text)


def test_policy_set_without_a_value_and_out_of_range_values_are_refused_here() -> None:
    with pytest.raises(ValueError, match="give --rto"):
        policy_body(parser().parse_args(["policy", "set", "--cluster", "lab"]))
    with pytest.raises(ValueError):  # 5 s: below the wire's 10 s minimum
        policy_body(parser().parse_args(["policy", "set", "--rto", "5s"]))


def test_commands_about_vms_select_by_name_id_or_migration() -> None:
    args = parser().parse_args(
        ["migrate-back", "web-1", "db-1", "--id", "vm-0007", "--power-on", "--keep-snapshot"]
    )
    select = selector(args)
    assert select.vms == (VmRef(name="web-1"), VmRef(name="db-1"), VmRef(vm_id="vm-0007"))
    assert args.power_on and args.keep_snapshot
    by_migration = selector(parser().parse_args(["commit", "--migration", "m-1"]))
    assert by_migration.migration_ids == ("m-1",)
    done = parser().parse_args(["bulk-done", "web-1", "--package", "s3://bucket/pkg"])
    assert done.package == "s3://bucket/pkg" and selector(done).vms == (VmRef(name="web-1"),)
    with pytest.raises(ValueError, match="name at least one VM"):
        selector(parser().parse_args(["sync"]))
    with pytest.raises(SystemExit):  # bulk-done without its package
        parser().parse_args(["bulk-done", "web-1"])


def test_migrate_takes_a_type_and_an_offline_package() -> None:
    args = parser().parse_args(
        ["migrate", "web-1", "--type", "warm", "--bulk", "offline", "--package", "/srv/pkg"]
    )
    body = clone_request(args, KEY).body
    assert body.migration_type is MigrationType.WARM
    assert body.bulk_transfer_mode is BulkTransferMode.OFFLINE
    assert body.package_location == "/srv/pkg"
    tbc = clone_request(parser().parse_args(["migrate", "web-1", "--type", "tbc"]), KEY).body
    assert tbc.migration_type is MigrationType.TBC and tbc.package_location is None
    with pytest.raises(ValueError, match="needs --package"):
        clone_request(parser().parse_args(["migrate", "w", "--bulk", "offline"]), KEY)
    with pytest.raises(ValueError, match="--bulk offline"):
        clone_request(parser().parse_args(["migrate", "w", "--package", "/srv/pkg"]), KEY)


def _status(kind: MigrationType, **figures: object) -> MigrationStatus:
    return MigrationStatus(
        migration_id=f"m-{kind.value}", request_id="r", vm_id="vm-1", vm_name=f"vm-{kind.value}",
        migration_type=kind, state=MigrationState.RUNNING, phase=Phase.POWER_ON,
        updated_at=datetime(2026, 12, 1, tzinfo=UTC), **figures,  # type: ignore[arg-type]
    )  # fmt: skip


def test_migrations_show_the_type_and_rpo_lag_of_vms_in_the_cloud() -> None:
    resting = _status(MigrationType.TBC, rpo_lag_s=725.0, committed_epoch=4, dirty_bytes=3 * 2**30)
    cold = _status(MigrationType.COLD)
    assert rpo_text(resting) == "12m05s, epoch 4, 3G dirty"
    assert rpo_text(cold) == ""
    console = Console(width=200, record=True)
    console.print(migrations_table([resting, cold]))
    lines = console.export_text().splitlines()
    row = next(line for line in lines if "vm-tbc" in line)
    assert "tbc" in row and "12m05s, epoch 4, 3G dirty" in row
    assert "RPO lag" in next(line for line in lines if "Migration " in line)


def test_a_refusal_says_what_was_refused_and_not_implemented_plainly() -> None:
    def error(code: ErrorCode, message: str) -> FerryError:
        body = ErrorResponseBody(code=code, message=message, command_type="CommitRequest")
        return FerryError(ErrorResponse(body=body))

    assert refusal(error(ErrorCode.NOT_IMPLEMENTED, "not yet")) == (
        "CommitRequest is not implemented by this appliance: not yet"
    )
    assert refusal(error(ErrorCode.CONFLICT, "it is migrating back")) == (
        "CommitRequest refused by the appliance (conflict): it is migrating back"
    )


def test_migrate_wait_ends_when_each_vm_is_done_or_runs_in_the_cloud() -> None:
    resting = _status(MigrationType.TBC).model_copy(update={"phase": Phase.IN_CLOUD})
    powering_on = _status(MigrationType.TBC)
    done = _status(MigrationType.COLD).model_copy(update={"state": MigrationState.COMPLETED})
    assert settled(resting) and settled(done) and not settled(powering_on)
    board = ProgressBoard(Console(record=True))
    board.update(done)
    board.update(powering_on)
    assert not board.finished
    board.update(resting)  # the same migration, now resting in the cloud
    assert board.finished
