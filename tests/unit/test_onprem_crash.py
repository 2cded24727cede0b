"""Crash safety of an epoch commit: stopped after every step, in process and by SIGKILL.

After the restart the current image must equal the disk before epoch N or
after it, exactly, never a mix; finishing the epoch (sending it again, or
replaying its commit) must then give the image after N, and a replay of a
commit already applied must change nothing.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.components.onprem import CommitStep, OnpremDiskOrder, OnpremIoManager, read_journal
from appliance.datapath.nbd import NbdBackend
from appliance.storage.layered import LayeredDisk
from tests.support.onprem import CHUNK, MIB, Epoch, apply_to, make_lab_disk, manifest_of, ship

SIZE = 1 * MIB
DISK = "disk-c"
TOKEN = 3
REPO = Path(__file__).parents[2]

FIRST: Epoch = {0: b"\x11" * CHUNK, 3: b"\x12" * CHUNK, 7: b"\x13" * CHUNK}
# The epoch stopped half-way: rewrites chunks of the first, zeroes one, writes new ones.
SECOND: Epoch = {
    0: b"\x21" * CHUNK,
    2: bytes(CHUNK),
    3: bytes(range(256)) * (CHUNK // 256),
    9: b"\x24" * CHUNK,
    15: b"\x25" * CHUNK,
}
BEFORE_COMMIT = (CommitStep.VERIFIED, CommitStep.STAGING_DURABLE)
AFTER_APPLIED = (CommitStep.APPLIED_RECORDED, CommitStep.STAGING_DROPPED)
UNLINKED = (*BEFORE_COMMIT, CommitStep.COMMIT_RECORDED, CommitStep.LAYER_PREPARED)
"""Steps after which the disk itself (its manifest) does not name the epoch's layer yet."""


class Crash(Exception):
    """Stands for the process dying at a step."""


async def read_current(manager: OnpremIoManager) -> bytes:
    async with await NbdBackend.connect(manager.address, f"cur/{DISK}") as backend:
        return await backend.read(0, backend.size)


async def lab(tmp_path: Path) -> tuple[OnpremDiskOrder, bytes, bytes]:
    snapshot_id, snapshot = await make_lab_disk(tmp_path / "lab-disk", SIZE, seed=9)
    order = OnpremDiskOrder("mig-c", DISK, TOKEN, tmp_path / "lab-disk", snapshot_id)
    before = apply_to(snapshot, FIRST)
    return order, before, apply_to(before, SECOND)


async def check_recovered(
    order: OnpremDiskOrder, data_dir: Path, step: CommitStep, before: bytes, after: bytes
) -> None:
    """Reopen after the crash: before-N or after-N exactly, then finish N idempotently."""
    committed = step not in BEFORE_COMMIT
    async with OnpremIoManager(data_dir) as manager:
        await manager.open_disk(order)
        assert await read_current(manager) == (after if committed else before)
        assert manager.committed_epoch(DISK) == (2 if committed else 1)
        assert manager.journal_state(DISK).committed_prefix
        assert not list((data_dir / "disks" / DISK).glob("stage-*"))
        assert not list(order.disk_dir.glob("staged-*"))  # linked, or discarded
        if not committed:
            await ship(manager, DISK, 2, TOKEN, SIZE, SECOND)
        await manager.commit_epoch(DISK, 2, TOKEN, manifest_of(SECOND))
        await manager.commit_epoch(DISK, 2, TOKEN, manifest_of(SECOND))
        assert await read_current(manager) == after
    # Opening again replays nothing more.
    async with OnpremIoManager(data_dir) as manager:
        await manager.open_disk(order)
        assert await read_current(manager) == after
        assert manager.committed_epoch(DISK) == 2
    assert read_journal(data_dir / "disks" / DISK / "journal").applied_epoch == 2


@pytest.mark.parametrize("step", list(CommitStep))
async def test_a_commit_stopped_after_any_step_recovers_whole(
    tmp_path: Path, step: CommitStep
) -> None:
    order, before, after = await lab(tmp_path)

    async def hook(disk_id: str, epoch: int, at: CommitStep) -> None:
        if epoch == 2 and at == step:
            raise Crash(step)

    data_dir = tmp_path / "onprem"
    async with OnpremIoManager(data_dir, commit_hook=hook) as manager:
        await manager.open_disk(order)
        await manager.commit_epoch(
            DISK, 1, TOKEN, (await ship(manager, DISK, 1, TOKEN, SIZE, FIRST))[0]
        )
        manifest, _ = await ship(manager, DISK, 2, TOKEN, SIZE, SECOND)
        with pytest.raises(Crash):
            await manager.commit_epoch(DISK, 2, TOKEN, manifest)
    await check_recovered(order, data_dir, step, before, after)


@pytest.mark.parametrize("step", list(CommitStep))
async def test_a_commit_replayed_in_the_same_process_finishes_the_epoch(
    tmp_path: Path, step: CommitStep
) -> None:
    order, _, after = await lab(tmp_path)
    armed = True

    async def hook(disk_id: str, epoch: int, at: CommitStep) -> None:
        nonlocal armed
        if epoch == 2 and at == step and armed:
            armed = False
            raise Crash(step)

    async with OnpremIoManager(tmp_path / "onprem", commit_hook=hook) as manager:
        await manager.open_disk(order)
        await manager.commit_epoch(
            DISK, 1, TOKEN, (await ship(manager, DISK, 1, TOKEN, SIZE, FIRST))[0]
        )
        manifest, _ = await ship(manager, DISK, 2, TOKEN, SIZE, SECOND)
        with pytest.raises(Crash):
            await manager.commit_epoch(DISK, 2, TOKEN, manifest)
        half_done = step not in (*BEFORE_COMMIT, *AFTER_APPLIED)
        assert manager.journal_state(DISK).committed_prefix == (not half_done)
        await manager.commit_epoch(DISK, 2, TOKEN, manifest)
        assert manager.journal_state(DISK).committed_prefix
        assert await read_current(manager) == after


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from appliance.components.onprem import OnpremDiskOrder, OnpremIoManager
    from tests.support.onprem import ship
    from tests.unit.test_onprem_crash import DISK, FIRST, SECOND, SIZE, TOKEN

    async def main(data_dir, disk_dir, snapshot_id, step):
        async def hook(disk_id, epoch, at):
            if epoch == 2 and at == step:
                print("stopped", at, flush=True)
                await asyncio.Event().wait()  # the parent kills us here

        order = OnpremDiskOrder("mig-c", DISK, TOKEN, Path(disk_dir), snapshot_id)
        async with OnpremIoManager(Path(data_dir), commit_hook=hook) as manager:
            await manager.open_disk(order)
            for number, epoch in ((1, FIRST), (2, SECOND)):
                manifest, _ = await ship(manager, DISK, number, TOKEN, SIZE, epoch)
                await manager.commit_epoch(DISK, number, TOKEN, manifest)
        print("finished", flush=True)

    asyncio.run(main(*sys.argv[1:]))
    """
)


async def stopped_line(stdout: asyncio.StreamReader) -> str:
    """The child's "stopped" line (its log lines share stdout); "" if it ended first."""
    while line := (await stdout.readline()).decode():
        if line.startswith(("stopped", "finished")):
            return line
    return ""


@pytest.mark.parametrize("step", list(CommitStep))
async def test_a_manager_killed_after_any_step_of_a_commit_recovers_whole(
    tmp_path: Path, step: CommitStep
) -> None:
    order, before, after = await lab(tmp_path)
    data_dir = tmp_path / "onprem"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(data_dir),
        str(order.disk_dir),
        order.snapshot_id,
        step.value,
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    assert child.stdout is not None
    try:
        line = await asyncio.wait_for(stopped_line(child.stdout), 60)
        assert line.split() == ["stopped", step.value], line
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    # The disk alone, without the journal's replay, is never a mix: before the epoch until
    # its manifest names the epoch's layer, after it from then on.
    async with await LayeredDisk.open(order.disk_dir) as disk:
        alone = await disk.active().read(0, SIZE)
    assert alone == (before if step in UNLINKED else after)
    await check_recovered(order, data_dir, step, before, after)


async def test_a_cancelled_caller_does_not_stop_a_commit_half_way(tmp_path: Path) -> None:
    order, _, after = await lab(tmp_path)
    reached, gate = asyncio.Event(), asyncio.Event()

    async def hook(disk_id: str, epoch: int, at: CommitStep) -> None:
        if epoch == 2 and at == CommitStep.LAYER_PREPARED:
            reached.set()
            await gate.wait()

    async with OnpremIoManager(tmp_path / "onprem", commit_hook=hook) as manager:
        await manager.open_disk(order)
        first, _ = await ship(manager, DISK, 1, TOKEN, SIZE, FIRST)
        await manager.commit_epoch(DISK, 1, TOKEN, first)
        manifest, _ = await ship(manager, DISK, 2, TOKEN, SIZE, SECOND)
        caller = asyncio.create_task(manager.commit_epoch(DISK, 2, TOKEN, manifest))
        await reached.wait()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        gate.set()
        await manager.commit_epoch(DISK, 2, TOKEN, manifest)  # waits for the lock: a no-op
        assert manager.committed_epoch(DISK) == 2
        assert await read_current(manager) == after
