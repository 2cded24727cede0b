"""The guest's ext4 disk, before and after: made on the host, checked without mounting.

``make_ext4`` makes the file system the guest mounts; after the guest stops,
``check_disk`` proves the image: ``e2fsck -fn`` finds nothing to fix, and
every expected file is there with exactly its bytes, read by ``debugfs``
(``rdump``), never through a mount. A guest that did not unmount (a power
cut, a snapshot of a running VM) left committed transactions in its journal,
which ``e2fsck -n`` does not replay: ``replay=True`` checks a copy with the
journal replayed, as the next mount would see it.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path


async def _run(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return await process.wait(), out.decode(errors="replace")


async def _check(*args: str) -> str:
    status, out = await _run(*args)
    if status != 0:
        raise AssertionError(f"{' '.join(args)} exited with {status}:\n{out}")
    return out


async def make_ext4(path: Path, size: int) -> None:
    """A sparse raw image of ``size`` bytes holding a fresh ext4 (inode tables written now)."""
    with path.open("wb") as image:
        image.truncate(size)
    lazy = "lazy_itable_init=0,lazy_journal_init=0"
    await _check("mkfs.ext4", "-q", "-F", "-L", "ferry-guest", "-E", lazy, str(path))


async def fsck(image: Path) -> str:
    """``e2fsck -fn``: a forced, read-only check that must find nothing to fix."""
    return await _check("e2fsck", "-fn", str(image))


async def replay_journal(image: Path, copy: Path) -> None:
    """``copy`` = ``image`` with its ext4 journal replayed, as the next mount would do.

    A guest that stops without unmounting (power cut, crash, a snapshot of a
    running VM) leaves committed transactions in the journal; ``e2fsck -fn``
    does not replay it, so it checks the copy.
    """
    await _check("cp", "--sparse=always", str(image), str(copy))
    status, out = await _run("e2fsck", "-y", "-E", "journal_only", str(copy))
    if status not in (0, 1):
        raise AssertionError(f"replaying the journal of {image} failed ({status}):\n{out}")


async def read_tree(image: Path, directory: str) -> dict[str, bytes]:
    """Every file under ``directory`` of the ext4 in ``image``, read by debugfs (no mount)."""
    with tempfile.TemporaryDirectory() as dump:
        out = await _check("debugfs", "-R", f"rdump /{directory} {dump}", str(image))
        # debugfs exits 0 whatever happens; a complaint other than not being
        # allowed to chown the copies (not root) is a failure.
        complaints = [
            line
            for line in out.splitlines()
            if line.startswith(("rdump:", "dump_file:")) and "changing ownership" not in line
        ]
        root = Path(dump)
        if complaints or not (root / Path(directory).name).is_dir():
            raise AssertionError(f"debugfs rdump /{directory} failed:\n{out}")
        return {
            str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*"))
            if path.is_file()
        }


async def check_disk(image: Path, expected: dict[str, bytes], *, replay: bool = False) -> None:
    """``image`` passes ``e2fsck -fn`` and holds every expected file with its exact bytes.

    ``replay`` checks a copy with the journal replayed (the guest did not unmount).
    """
    if replay:
        with tempfile.TemporaryDirectory() as work:
            copy = Path(work) / "replayed.raw"
            await replay_journal(image, copy)
            await check_disk(copy, expected)
        return
    await fsck(image)
    found = await read_tree(image, "ferry") if expected else {}
    missing = sorted(set(expected) - set(found))
    wrong = sorted(name for name in set(expected) & set(found) if found[name] != expected[name])
    assert not missing, f"{len(missing)} synced files missing, e.g. {missing[:5]}"
    assert not wrong, f"{len(wrong)} synced files with wrong bytes, e.g. {wrong[:5]}"
