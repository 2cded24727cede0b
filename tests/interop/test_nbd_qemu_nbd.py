"""Our NBD client against qemu-nbd: qcow2 holes via BLOCK_STATUS, right bytes, writes that land."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.datapath.nbd.backend import NbdBackend
from appliance.datapath.nbd.channel import TcpAddress, UnixAddress
from appliance.errors import ConnectionDropped
from appliance.storage.extents import Extent, clip, data_length

MiB = 1024 * 1024
SIZE = 16 * MiB
START_TIMEOUT = 20.0


class QemuNbd:
    """A qemu-nbd process in its own session, stopped by PID."""

    def __init__(self, image: Path, fmt: str, export: str, address: UnixAddress | TcpAddress):
        self.image = image
        self.export = export
        self.address = address
        args = ["qemu-nbd", "-f", fmt, "-x", export, "--persistent", "--shared=8"]
        if isinstance(address, UnixAddress):
            args += ["-k", str(address.path)]
        else:
            args += ["-b", address.host, "-p", str(address.port)]
        self.process = subprocess.Popen(
            [*args, str(image)],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._wait_until_listening()

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                assert self.process.stderr is not None
                raise RuntimeError(f"qemu-nbd exited: {self.process.stderr.read().decode()}")
            try:
                if isinstance(self.address, UnixAddress):
                    with socket.socket(socket.AF_UNIX) as probe:
                        probe.connect(str(self.address.path))
                else:
                    socket.create_connection((self.address.host, self.address.port), 1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError("qemu-nbd did not start listening")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()


def qemu(*args: str) -> str:
    """Run a qemu tool that does not talk to a server in this event loop."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}{result.stderr}"
    return result.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must stay under 108 bytes; pytest's tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="ferry-nbd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def qcow2(tmp_path: Path) -> Path:
    """A qcow2 image: data at 1 MiB, 9 MiB and an unaligned bit at 12 MiB, the rest unallocated."""
    image = tmp_path / "disk.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE))
    qemu(
        "qemu-io", "-f", "qcow2", str(image),
        "-c", "write -P 0x61 1M 512K",
        "-c", "write -P 0x62 9M 64K",
        "-c", "write -P 0x63 12582912 1000",
    )  # fmt: skip
    return image


@pytest.fixture
def qcow2_server(qcow2: Path, short_dir: Path) -> Iterator[QemuNbd]:
    server = QemuNbd(qcow2, "qcow2", "vm-disk", UnixAddress(short_dir / "nbd.sock"))
    yield server
    server.stop()


async def test_client_reads_a_qcow2_served_by_qemu_nbd_and_sees_its_holes(
    qcow2_server: QemuNbd, tmp_path: Path
) -> None:
    expected = tmp_path / "expected.raw"
    qemu(
        "qemu-img",
        "convert",
        "-U",
        "-f",
        "qcow2",
        "-O",
        "raw",
        str(qcow2_server.image),
        str(expected),
    )
    content = expected.read_bytes()
    async with await NbdBackend.connect(qcow2_server.address, "vm-disk") as backend:
        assert backend.size == SIZE
        assert await backend.checksum(0, 10) is None  # qemu-nbd has no Ferry extension
        extents = await backend.extents()
        assert extents[0] == Extent(0, MiB, zero=True, hole=True)
        assert all(extent.data for extent in clip(extents, MiB, MiB + 512 * 1024))
        assert all(extent.hole for extent in clip(extents, 2 * MiB, 9 * MiB))
        assert data_length(extents) < 4 * MiB
        assert await backend.read(0, SIZE) == content
        assert await backend.read(MiB + 7, 10) == b"a" * 10
        assert await backend.read(12582912 + 999, 2) == b"c\0"


async def test_client_writes_land_in_a_raw_image_served_by_qemu_nbd(tmp_path: Path) -> None:
    image = tmp_path / "target.raw"
    image.write_bytes(b"")
    os.truncate(image, SIZE)
    expected = bytearray(SIZE)
    server = QemuNbd(image, "raw", "target", TcpAddress("127.0.0.1", free_port()))
    try:
        async with await NbdBackend.connect(server.address, "target") as backend:
            data = os.urandom(3 * MiB + 5)
            await backend.write(123, data)
            expected[123 : 123 + len(data)] = data
            await backend.zero(MiB, 4096, punch_hole=True)
            expected[MiB : MiB + 4096] = bytes(4096)
            await backend.zero(2 * MiB + 1, 100)
            expected[2 * MiB + 1 : 2 * MiB + 101] = bytes(100)
            await backend.write(SIZE - 10, b"0123456789")
            expected[SIZE - 10 :] = b"0123456789"
            # No Ferry extension at qemu-nbd: written all the same, not verified.
            assert await backend.write_verified(2 * MiB + 500, b"verified?") is None
            expected[2 * MiB + 500 : 2 * MiB + 509] = b"verified?"
            await backend.flush()
            extents = await backend.extents()
            assert sum(extent.length for extent in extents) == SIZE
            assert backend.bytes_sent > len(data)
    finally:
        server.stop()
    reference = tmp_path / "expected.raw"
    reference.write_bytes(expected)
    output = qemu("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), str(reference))
    assert "identical" in output


async def test_backend_reconnects_after_qemu_nbd_restarts(tmp_path: Path, short_dir: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"before" + bytes(MiB - 6))
    address = UnixAddress(short_dir / "nbd.sock")
    server = QemuNbd(image, "raw", "disk", address)
    try:
        async with await NbdBackend.connect(address, "disk") as backend:
            assert await backend.read(0, 6) == b"before"
            server.stop()
            with pytest.raises(ConnectionDropped):
                await backend.read(0, 6)
            server = QemuNbd(image, "raw", "disk", address)
            assert await backend.read(0, 6) == b"before"
            assert backend.reconnects == 1
    finally:
        server.stop()
