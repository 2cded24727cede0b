"""Reconcile into a volume qemu's own NBD server exports (a qcow2, as a QEMU site's would
be): no Ferry extension there, so every chunk a pass writes is verified by reading it back,
and the whole-image check reads the volume's side; ``qemu-img compare`` then finds the
qcow2 equal to the cache's view of the disk.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.components.cache.image import image_export
from appliance.components.cache.reconcile import VolumeTarget
from appliance.components.reconciling import check_volume, parse_volume
from appliance.datapath.nbd.channel import UnixAddress
from tests.interop.test_nbd_qemu_nbd import QemuNbd, qemu
from tests.support.cachelab import DISK, KiB, MiB, cache_lab, image_bytes

SIZE = 4 * MiB + 4096


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must stay under 108 bytes; pytest's tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="ferry-rc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_passes_into_a_qcow2_that_qemu_nbd_serves(tmp_path: Path, short_dir: Path) -> None:
    content = image_bytes(SIZE, seed=41)
    model = bytearray(content)
    rng = random.Random(42)
    async with cache_lab(tmp_path, content) as lab:
        volume_file = tmp_path / "volume.qcow2"
        onprem = str(tmp_path / "onprem.raw")
        qemu("qemu-img", "convert", "-f", "raw", "-O", "qcow2", onprem, str(volume_file))
        server = QemuNbd(volume_file, "qcow2", "volume", UnixAddress(short_dir / "vol.sock"))
        try:
            params = {"volume": f"unix:{short_dir / 'vol.sock'}", "volume_export": "volume"}
            target = parse_volume(params)  # as a reconcile order names it
            assert isinstance(target, VolumeTarget)
            for pass_no in (1, 2):
                for _ in range(25):
                    offset = rng.randrange(0, SIZE - 1)
                    data = rng.randbytes(min(rng.randrange(1, 150 * KiB), SIZE - offset))
                    await lab.vm.write(offset, data)
                    model[offset : offset + len(data)] = data
                result = await lab.cache.reconcile(DISK, 1, pass_no, target)
                assert result.chunks > 0 and result.remainder_bytes == 0
            last = await lab.cache.reconcile(DISK, 1, 3, target)
            assert last.chunks == 0
            check = await check_volume(lab.cache.server.address, image_export(DISK), target)
            assert check.equal, check
        finally:
            server.stop()
        view = tmp_path / "cache-view.raw"
        view.write_bytes(await lab.vm.read(0, SIZE))
        assert bytes(model) == view.read_bytes()
        compare = await asyncio.create_subprocess_exec(
            *("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(view), str(volume_file)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(compare.communicate(), 60)
        assert compare.returncode == 0, output.decode()
