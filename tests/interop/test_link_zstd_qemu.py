"""qemu-io through a compressed WAN link: qemu-nbd serves a raw file on the far side, the
link's two ZstdRelays and a counting proxy lie between, qemu-io does unaligned writes,
write-zeroes and pattern reads; the file then holds exactly what qemu-io wrote."""

from __future__ import annotations

from pathlib import Path

from appliance.datapath.link import ZstdRelay
from appliance.datapath.nbd import TcpAddress
from appliance.embedded import free_port
from tests.interop.test_nbd_qemu import qemu_io
from tests.interop.test_nbd_qemu_nbd import QemuNbd
from tests.support.faultproxy import FaultProxy

SIZE = 4 * 1024 * 1024


async def test_qemu_io_through_a_compressed_link_is_exact(tmp_path: Path) -> None:
    image = tmp_path / "far.raw"
    image.write_bytes(bytes(range(256)) * (SIZE // 256))
    model = bytearray(image.read_bytes())
    address = TcpAddress("127.0.0.1", free_port())
    server = QemuNbd(image, "raw", "d", address)
    try:
        await exercise(address, model)
    finally:
        server.stop()
    assert image.read_bytes() == model


async def exercise(server: TcpAddress, model: bytearray) -> None:
    loopback = TcpAddress("127.0.0.1", 0)
    async with (
        ZstdRelay(loopback, server, accepts="zstd") as far,
        FaultProxy("127.0.0.1", far.port) as wan,
        ZstdRelay(loopback, TcpAddress("127.0.0.1", wan.port), accepts="plain") as near,
    ):
        url = f"nbd://127.0.0.1:{near.port}/d"
        await qemu_io(
            url,
            "write -P 0xab 1000 70000",
            "write -z 300001 99999",
            "write -P 0x5c 4000000 194304",
            "flush",
        )
        model[1000:71000] = b"\xab" * 70000
        model[300001:400000] = bytes(99999)
        model[4000000:4194304] = b"\x5c" * 194304
        output = await qemu_io(
            url,
            "read -P 0xab 1000 70000",
            "read -P 0 300001 99999",
            "read -P 0x5c 4000000 194304",
            "read -v 0 16",
        )
        assert output.count("read ") == 4
        assert "00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f" in output
        assert wan.bytes_up + wan.bytes_down < near.plain_bytes / 4
