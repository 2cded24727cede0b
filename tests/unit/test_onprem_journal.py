"""The epoch journal and the staging area on their own: formats, torn tails, corruption."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.components.onprem import EpochManifest, ManifestEntry, StagingBackend, read_journal
from appliance.components.onprem.journal import EpochJournal
from appliance.components.onprem.manifest import decode_manifest, encode_manifest
from appliance.errors import JournalCorrupt
from appliance.storage.hashing import chunk_hash, zero_hash

KIB = 1024


def manifest(*pieces: tuple[int, bytes]) -> EpochManifest:
    return EpochManifest.build(
        ManifestEntry(at, len(data), chunk_hash(data)) for at, data in pieces
    )


ONE = manifest((0, b"a" * 4096), (8192, b"b" * 100))
TWO = manifest((4096, bytes(4096)))


def test_a_manifest_round_trips_and_checks_itself() -> None:
    assert decode_manifest(encode_manifest(ONE)) == ONE
    assert ONE.problem(16 * KIB) is None
    assert ONE.problem(8192) is not None  # an entry past the end
    overlapping = EpochManifest.build(
        [ManifestEntry(0, 4096, zero_hash(4096)), ManifestEntry(100, 10, zero_hash(10))]
    )
    assert overlapping.problem(16 * KIB) is not None
    assert EpochManifest(ONE.entries, TWO.digest).problem(16 * KIB) is not None
    with pytest.raises(ValueError):
        decode_manifest(encode_manifest(ONE)[:-1])


def test_records_replay_in_sequence(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal = EpochJournal.open(path)
    journal.append_commit(1, 5, ONE)
    state = read_journal(path)
    assert (state.applied_epoch, state.pending, state.committed_prefix) == (0, ONE, False)
    journal.append_applied(1, 5)
    journal.append_commit(2, 6, TWO)
    journal.append_applied(2, 6)
    journal.close()
    state = read_journal(path)
    assert (state.applied_epoch, state.committed_epoch, state.committed_prefix) == (2, 2, True)
    assert (state.digest(1), state.digest(2), state.digest(3)) == (ONE.digest, TWO.digest, None)
    with pytest.raises(ValueError):
        EpochJournal.open(path).append_commit(4, 6, ONE)  # a gap is never written


@pytest.mark.parametrize("cut", [1, 10, 30, -1])
def test_a_torn_last_record_is_ignored_then_cut_off(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "journal"
    journal = EpochJournal.open(path)
    journal.append_commit(1, 5, ONE)
    journal.append_applied(1, 5)
    whole = path.stat().st_size
    journal.append_commit(2, 5, TWO)
    journal.close()
    data = path.read_bytes()
    path.write_bytes(data[: whole + cut] if cut > 0 else data[:-1])
    assert read_journal(path).committed_epoch == 1
    reopened = EpochJournal.open(path)
    assert path.stat().st_size == whole
    reopened.append_commit(2, 5, TWO)
    reopened.close()
    assert read_journal(path).pending == TWO


def test_damage_before_the_tail_is_corruption(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal = EpochJournal.open(path)
    journal.append_commit(1, 5, ONE)
    journal.append_applied(1, 5)
    journal.close()
    data = bytearray(path.read_bytes())
    data[30] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt) as corrupt:
        read_journal(path)
    assert corrupt.value.offset == 0


async def test_staging_records_what_landed_and_finds_strays(tmp_path: Path) -> None:
    async with await StagingBackend.create(tmp_path, 3, 64 * KIB) as staging:
        await staging.write(0, b"a" * 4096)
        await staging.zero(4096, 4096)
        await staging.write(9000, b"x")
        await staging.flush()
        landed = (tmp_path / "stage-3" / "landed.log").read_bytes()
        assert len(landed) == 3 * 41
        good = manifest((0, b"a" * 4096), (4096, bytes(4096)))
        assert staging.problem(good) == "1 bytes at 9000 landed outside the manifest"
        covering = manifest((0, b"a" * 4096), (4096, bytes(4096)), (8192, bytes(4096)))
        assert staging.problem(covering) is None
        assert (await staging.mismatch(covering)).offset == 8192  # type: ignore[union-attr]
        await staging.seal()
        with pytest.raises(PermissionError):
            await staging.write(0, b"b")


async def test_sealing_waits_for_a_write_in_flight(tmp_path: Path) -> None:
    async with await StagingBackend.create(tmp_path, 1, 64 * KIB) as staging:
        writing = asyncio.ensure_future(staging.write(4096, b"w" * 4096))
        sealing = asyncio.ensure_future(staging.seal())  # runs after the write started
        await sealing
        assert writing.done()
        assert staging.landed_bytes == 4096
        assert await staging.read(4096, 4096) == b"w" * 4096
