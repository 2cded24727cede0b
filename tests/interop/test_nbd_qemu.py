"""Our NBD server, checked by qemu's own tools: qemu-io, qemu-img convert, compare and map.

The server runs in the test's event loop, so the tools run as asyncio
subprocesses (a blocking call would starve the server they talk to).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.datapath.nbd.channel import UnixAddress
from appliance.datapath.nbd.server import NbdServer
from appliance.storage.file import FileBackend

MiB = 1024 * 1024
SIZE = 8 * MiB
TOOL_TIMEOUT = 60.0


async def run(*args: str) -> str:
    """Run a tool to completion; fail the test with its output if it fails."""
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), TOOL_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    text = output.decode()
    assert process.returncode == 0, f"{' '.join(args)} failed:\n{text}"
    return text


async def qemu_io(url: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw", url]
    for command in commands:
        args += ["-c", command]
    output = await run(*args)
    assert "fail" not in output.lower() and "error" not in output.lower(), output
    return output


def make_source(path: Path) -> bytes:
    """A sparse raw image: data, holes, and an allocated run of zeroes, unaligned edges included."""
    content = bytearray(SIZE)
    content[0:MiB] = os.urandom(MiB)
    content[3 * MiB + 4096 : 4 * MiB] = os.urandom(MiB - 4096)
    content[7 * MiB : 7 * MiB + 65536] = b"\x5a" * 65536
    with path.open("wb") as file:
        file.truncate(SIZE)
        for start, end in ((0, MiB), (3 * MiB + 4096, 4 * MiB), (7 * MiB, 7 * MiB + 65536)):
            file.seek(start)
            file.write(content[start:end])
        file.seek(5 * MiB)
        file.write(bytes(MiB))  # allocated, but zero
    return bytes(content)


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "source.raw"
    return path, make_source(path)


@pytest.fixture
async def server(source: tuple[Path, bytes]) -> AsyncIterator[NbdServer]:
    async with (
        FileBackend.open(source[0]) as backend,
        NbdServer({"disk": backend}) as running,
    ):
        yield running


async def test_qemu_io_writes_and_reads_patterns_through_our_server(
    server: NbdServer, source: tuple[Path, bytes]
) -> None:
    url = server.url("disk")
    await qemu_io(
        url,
        "write -P 0xab 65536 65536",
        "write -P 0xcd 1000 3000",
        "write -z 3145728 8192",
        "flush",
    )
    output = await qemu_io(
        url,
        "read -P 0xab 69000 60000",
        "read -P 0xcd 1000 3000",
        "read -P 0 3145728 8192",
        "read -P 0x5a 7340032 65536",
    )
    assert output.count("read ") == 4
    on_disk = source[0].read_bytes()
    assert on_disk[65536:131072] == b"\xab" * 65536
    assert on_disk[1000:4000] == b"\xcd" * 3000
    assert on_disk[3 * MiB : 3 * MiB + 8192] == bytes(8192)
    assert on_disk[4000:65536] == source[1][4000:65536]


async def test_qemu_io_over_a_unix_socket(tmp_path: Path, source: tuple[Path, bytes]) -> None:
    socket_path = Path(f"/tmp/ferry-nbd-{os.getpid()}-{id(tmp_path)}.sock")
    async with (
        FileBackend.open(source[0]) as backend,
        NbdServer({"disk": backend}, address=UnixAddress(socket_path)) as server,
    ):
        await qemu_io(server.url("disk"), "write -P 0x11 0 4096", "read -P 0x11 0 4096")
    assert source[0].read_bytes()[:4096] == b"\x11" * 4096


async def test_qemu_img_convert_copies_our_export_identically(
    server: NbdServer, source: tuple[Path, bytes], tmp_path: Path
) -> None:
    copy = tmp_path / "copy.raw"
    await run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.url("disk"), str(copy))
    assert "identical" in await run(
        "qemu-img", "compare", "-f", "raw", "-F", "raw", str(source[0]), str(copy)
    )
    assert copy.read_bytes() == source[1]


async def test_qemu_img_convert_writes_into_our_export(
    server: NbdServer, source: tuple[Path, bytes], tmp_path: Path
) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(SIZE))
    await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), server.url("disk"))
    assert source[0].read_bytes() == image.read_bytes()


async def test_nbdcopy_between_two_of_our_exports_is_identical(
    source: tuple[Path, bytes], tmp_path: Path
) -> None:
    """nbdcopy: structured replies, block status, several connections, many requests in flight."""
    target = tmp_path / "target.raw"
    target.write_bytes(os.urandom(SIZE))  # stale content: the copy must overwrite or zero it all
    async with (
        FileBackend.open(source[0], readonly=True) as source_file,
        FileBackend.open(target) as target_file,
        NbdServer({"src": source_file, "dst": target_file}) as both,
    ):
        await run("nbdcopy", "--flush", both.url("src"), both.url("dst"))
    assert target.read_bytes() == source[1]


async def test_qemu_img_map_over_our_server_sees_the_file_allocation(
    server: NbdServer, source: tuple[Path, bytes]
) -> None:
    remote = await qemu_map(server.url("disk"))
    local = await qemu_map(str(source[0]))
    assert remote == local
    assert any(entry[2] for entry in remote) and any(not entry[2] for entry in remote)
    assert (0, MiB, True, False) == remote[0]


async def qemu_map(target: str) -> list[tuple[int, int, bool, bool]]:
    """``qemu-img map`` as merged (start, length, data, zero) runs."""
    entries = json.loads(await run("qemu-img", "map", "--output=json", "-f", "raw", target))
    runs: list[tuple[int, int, bool, bool]] = []
    for entry in entries:
        start, length, data, zero = entry["start"], entry["length"], entry["data"], entry["zero"]
        if runs and runs[-1][2:] == (data, zero) and sum(runs[-1][:2]) == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + length, data, zero)
        else:
            runs.append((start, length, data, zero))
    return runs


async def test_qemu_img_info_and_read_only_export(
    server: NbdServer, source: tuple[Path, bytes]
) -> None:
    async with FileBackend.open(source[0], readonly=True) as readonly:
        server.add_export("ro", readonly)
        info = json.loads(await run("qemu-img", "info", "--output=json", server.url("ro")))
        assert info["virtual-size"] == SIZE
        process = await asyncio.create_subprocess_exec(
            "qemu-io",
            "-f",
            "raw",
            server.url("ro"),
            "-c",
            "write -P 0x77 0 512",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), TOOL_TIMEOUT)
        assert b"wrote" not in output
    assert source[0].read_bytes()[:512] == source[1][:512]
