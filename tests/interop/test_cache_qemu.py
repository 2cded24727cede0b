"""The cloud cache's export, checked by qemu's own tools as independent peers.

qemu-io does unaligned reads, writes and write-zeroes against the cache;
qemu-img map sees its allocation (on-prem holes stay holes, writes are data);
after the epoch commits, qemu-img compare finds the on-prem image identical to
the replay of the writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.interop.test_nbd_qemu import qemu_io, run
from tests.support.cachelab import KiB, MiB, cache_lab

SIZE = 8 * MiB


def onprem_content() -> bytes:
    """Data in the first 2 MiB and at 5 MiB; holes elsewhere."""
    content = bytearray(SIZE)
    content[: 2 * MiB] = bytes(range(256)) * (2 * MiB // 256)
    content[5 * MiB : 5 * MiB + 256 * KiB] = b"\x77" * (256 * KiB)
    return bytes(content)


async def test_qemu_io_unaligned_io_and_write_zeroes_through_the_cache(tmp_path: Path) -> None:
    content = onprem_content()
    model = bytearray(content)
    async with cache_lab(tmp_path, content) as lab:
        url = lab.cache.server.url("disk-0")
        await qemu_io(
            url,
            "write -P 0xab 1000 70000",  # unaligned, across two chunks, over on-prem data
            "write -P 0xcd 3145829 4097",  # unaligned, inside an on-prem hole
            "write -z 5308416 100000",  # zeroes over on-prem data, unaligned end
            "flush",
        )
        model[1000:71000] = b"\xab" * 70000
        model[3145829 : 3145829 + 4097] = b"\xcd" * 4097
        model[5308416 : 5308416 + 100000] = bytes(100000)
        output = await qemu_io(
            url,
            "read -P 0xab 1000 70000",
            "read -P 0xcd 3145829 4097",
            "read -P 0 5308416 100000",
            "read -P 0x77 5408416 10000",
            "read -P 0 7000000 12345",
        )
        assert output.count("read ") == 5
        assert await lab.vm.read(0, SIZE) == model
        assert lab.sink.read_image() == content
        epoch = await lab.cache.cut_epoch("disk-0", 1)
        await lab.cache.wait_committed("disk-0", epoch)
        replay = tmp_path / "replay.raw"
        replay.write_bytes(model)
        assert "identical" in await run(
            "qemu-img", "compare", "-f", "raw", "-F", "raw", str(lab.sink.image), str(replay)
        )


async def test_qemu_img_map_sees_the_cache_allocation(tmp_path: Path) -> None:
    async with cache_lab(tmp_path, onprem_content()) as lab:
        await lab.vm.write(3 * MiB, b"\x01" * 4096)  # a write inside an on-prem hole
        url = lab.cache.server.url("disk-0")
        output = await run("qemu-img", "map", "--output=json", "-f", "raw", url)
        mapped = json.loads(output)
        data = [(e["start"], e["length"]) for e in mapped if e["data"]]
        holes = [(e["start"], e["length"]) for e in mapped if not e["data"]]
        assert (0, 2 * MiB) in data
        assert (3 * MiB, 64 * KiB) in data  # the written chunk
        assert (5 * MiB, 256 * KiB) in data
        assert (2 * MiB, MiB) in holes
        assert sum(length for _, length in data + holes) == SIZE
        assert all(e["zero"] for e in mapped if not e["data"])
