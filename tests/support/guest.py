"""A real Linux guest under QEMU, its disk on an NBD export (DESIGN.md §7).

``build_guest`` runs ``tests/interop/guests/build.sh`` (Debian's cloud kernel
and a busybox-static initramfs; cached under ``build/guest/``). ``GuestVm``
boots it with one virtio disk at an NBD URL, reads the serial console as a
stream and wakes its waiters on the markers ``/init`` prints (never on a
sleep), and stops QEMU by PID. The guest writes the files of a ``Workload``
on the ext4 the host made; ``tests.support.ext4.check_disk`` then proves the
image (``e2fsck -fn`` clean, every synced file there with its exact bytes).

KVM is used when ``/dev/kvm`` works; some machines fail with it ("failed to
set MSR", or a vCPU that never runs), so a KVM guest that has not reached
``/init`` within ``KVM_BOOT_TIMEOUT`` is stopped and booted again under TCG,
and the verdict is remembered (in the build directory, per host kernel and
QEMU binary). ``FERRY_GUEST_ACCEL=kvm|tcg`` forces one.

Usage::

    image = build_guest()
    await make_ext4(raw, 64 * MiB)
    async with qemu_nbd_export(raw) as url:              # or NbdServer(...).url("disk")
        async with GuestVm(image, url, Workload(3, 4), console=log) as vm:
            await vm.wait_exit(within_s=120)
    await check_disk(raw, Workload(3, 4).expected(vm.synced))
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tests" / "interop" / "guests" / "build.sh"
DEFAULT_BUILD_DIR = REPO / "build" / "guest"
QEMU = "qemu-system-x86_64"
KVM_BOOT_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
KVM_FAILURE = re.compile(r"kvm|KVM|MSR")
MARKER = re.compile(r"FERRY-(BOOT|MOUNTED|SYNCED|DONE|ERROR)\b ?(.*)")
CONSOLE_TAIL = 40
CONSOLE_LINE_LIMIT = 1 << 20

Accel = Literal["kvm", "tcg"]
End = Literal["unmount", "crash", "hold"]


class GuestError(AssertionError):
    """The guest did not do what the test waited for; carries the console's tail."""

    def __init__(self, what: str, console: list[str]) -> None:
        tail = "\n".join(console[-CONSOLE_TAIL:])
        super().__init__(f"{what}\n--- guest console (last {CONSOLE_TAIL} lines) ---\n{tail}")
        self.what = what


# -- the image ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GuestImage:
    kernel: Path
    initrd: Path
    release: str
    build_dir: Path


def build_guest(build_dir: Path = DEFAULT_BUILD_DIR) -> GuestImage:
    """Build (or find, when nothing changed) the guest's kernel and initramfs."""
    result = subprocess.run(
        [str(BUILD_SCRIPT), str(build_dir)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} failed:\n{result.stdout}{result.stderr}")
    out = Path(result.stdout.strip().splitlines()[-1])
    release = (out / "kernel-release").read_text().strip()
    return GuestImage(out / "vmlinuz", out / "initrd.img", release, build_dir)


# -- the workload ---------------------------------------------------------------------------------


def file_size(seed: int, batch: int, index: int) -> int:
    """The size of file ``index`` of ``batch``: what ``size_of`` in the guest's /init says."""
    return 1 + (seed * 7919 + batch * 6151 + index * 3079) % 1000003 * 48271 % 98304


def file_content(seed: int, batch: int, index: int) -> bytes:
    """The bytes the guest writes to ``ferry/b<batch>/f<index>``: lines carrying their offset."""
    size = file_size(seed, batch, index)
    parts: list[bytes] = []
    offset = 0
    while offset < size:
        line = f"ferry s={seed} b={batch} f={index} o={offset:010d}\n".encode()[: size - offset]
        parts.append(line)
        offset += len(line)
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Workload:
    """``batches`` of ``files`` files each (0 batches: until the host stops the guest).

    After each batch the guest runs ``sync`` and prints ``FERRY-SYNCED <batch>``.
    With ``step`` it then waits for ``GuestVm.proceed`` (a line on its console):
    the host holds the guest still between two batches. When every batch is
    synced, ``end`` says what it does: ``unmount`` then power off, power off
    still mounted (``crash``), or wait to be stopped (``hold``).
    """

    batches: int
    files: int
    seed: int = 1
    end: End = "unmount"
    step: bool = False

    def kernel_args(self) -> list[str]:
        return [
            f"ferry.workload=write:{self.batches}:{self.files}",
            f"ferry.seed={self.seed}",
            f"ferry.end={self.end}",
            f"ferry.step={int(self.step)}",
        ]

    def expected(self, through: int) -> dict[str, bytes]:
        """Every file of batches 1..``through``, by its path in the guest's file system."""
        return {
            f"ferry/b{batch}/f{index}": file_content(self.seed, batch, index)
            for batch in range(1, through + 1)
            for index in range(1, self.files + 1)
        }


# -- the accelerator ------------------------------------------------------------------------------

_verdict: dict[Path, Accel] = {}


def _verdict_file(build_dir: Path) -> Path:
    qemu = shutil.which(QEMU) or QEMU
    stat = os.stat(qemu)
    key = f"{os.uname().release}|{qemu}|{stat.st_size}|{stat.st_mtime_ns}"
    return build_dir / f"accel-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _kvm_openable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def choose_accel(build_dir: Path) -> Accel:
    """KVM unless it is forced off, unusable, or known to fail on this host."""
    forced = os.environ.get("FERRY_GUEST_ACCEL")
    if forced in ("kvm", "tcg"):
        return "kvm" if forced == "kvm" else "tcg"
    if build_dir in _verdict:
        return _verdict[build_dir]
    if not _kvm_openable():
        return "tcg"
    with contextlib.suppress(OSError):
        if _verdict_file(build_dir).read_text().strip() == "tcg":
            return "tcg"
    return "kvm"


def remember_accel(build_dir: Path, accel: Accel) -> None:
    _verdict[build_dir] = accel
    with contextlib.suppress(OSError):
        _verdict_file(build_dir).write_text(accel + "\n")


# -- the VM ---------------------------------------------------------------------------------------


class GuestVm:
    """A QEMU process running the guest; ``async with`` boots it, leaving stops it by PID."""

    def __init__(
        self,
        image: GuestImage,
        disk_url: str | None,
        workload: Workload | None,
        *,
        console: Path,
        accel: Accel | None = None,
        memory_mib: int = 256,
    ) -> None:
        self.image = image
        self.disk_url = disk_url
        self.workload = workload
        self.console_path = console
        self.memory_mib = memory_mib
        self.accel: Accel = accel or choose_accel(image.build_dir)
        self._forced = accel is not None or "FERRY_GUEST_ACCEL" in os.environ
        self.console: list[str] = []
        self.booted = False
        self.mounted = False
        self.synced = 0
        self.done = False
        self.error: str | None = None
        self.returncode: int | None = None
        self.boot_seconds: float | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._log: IO[str] | None = None
        self._started = 0.0

    def qemu_args(self) -> list[str]:
        append = ["console=ttyS0", "quiet", "loglevel=3", "panic=-1"]
        append += self.workload.kernel_args() if self.workload else ["ferry.workload=none"]
        args = [QEMU, "-accel", self.accel, "-m", str(self.memory_mib), "-smp", "1"]
        args += ["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"]
        args += ["-no-reboot", "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd)]
        args += ["-append", " ".join(append)]
        if self.disk_url is not None:
            url = self.disk_url.replace(",", ",,")
            args += ["-drive", f"file={url},format=raw,if=none,id=disk0,cache=writeback"]
            args += ["-device", "virtio-blk-pci,drive=disk0"]
        return args

    async def __aenter__(self) -> Self:
        self._log = self.console_path.open("a", encoding="utf-8")
        try:
            await self._launch()
            if self.accel == "kvm" and not self._forced and not await self._boots_in_time():
                self._blame_kvm()
                self._note(f"(no /init under KVM within {KVM_BOOT_TIMEOUT:.0f} s: using TCG)")
                await self.kill()
                remember_accel(self.image.build_dir, "tcg")
                self.accel = "tcg"
                self._reset()
                await self._launch()
            elif self.accel == "kvm" and self.booted:
                remember_accel(self.image.build_dir, "kvm")
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _boots_in_time(self) -> bool:
        with contextlib.suppress(GuestError):
            await self._wait(lambda: self.booted, KVM_BOOT_TIMEOUT, "boot")
        return self.booted

    def _blame_kvm(self) -> None:
        """Raise unless KVM is what failed: it hung, or QEMU's last words name it."""
        said = [line for line in self.console if not line.startswith(("$ ", "("))]
        if self.returncode is None or any(KVM_FAILURE.search(line) for line in said):
            return
        raise GuestError(f"qemu exited ({self.returncode}) before FERRY-BOOT", self.console)

    def _reset(self) -> None:
        self.booted = self.mounted = self.done = False
        self.synced = 0
        self.error = None
        self.returncode = None
        self.boot_seconds = None

    async def _launch(self) -> None:
        self._note(f"$ {' '.join(self.qemu_args())}")
        self._started = time.monotonic()
        self._process = await asyncio.create_subprocess_exec(
            *self.qemu_args(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            limit=CONSOLE_LINE_LIMIT,
        )
        self._reader = asyncio.create_task(self._read_console(self._process))

    def _note(self, line: str) -> None:
        self.console.append(line)
        if self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()

    async def _read_console(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        try:
            async for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                self._note(line)
                match = MARKER.search(line)
                if match is not None:
                    self._on_marker(match.group(1), match.group(2).strip())
                    async with self._changed:
                        self._changed.notify_all()
        except ValueError as error:  # a "line" longer than CONSOLE_LINE_LIMIT
            self._note(f"(console unreadable: {error}; stopping qemu)")
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
        returncode = await process.wait()
        async with self._changed:
            self.returncode = returncode
            self._note(f"(qemu exited with status {returncode})")
            self._changed.notify_all()

    def _on_marker(self, kind: str, rest: str) -> None:
        if kind == "BOOT":
            self.booted = True
            self.boot_seconds = time.monotonic() - self._started
        elif kind == "MOUNTED":
            self.mounted = True
        elif kind == "SYNCED":
            self.synced = max(self.synced, int(rest.split()[0]))
        elif kind == "DONE":
            self.done = True
        else:
            self.error = rest or "unknown"

    async def _wait(self, ready: Callable[[], bool], within_s: float, what: str) -> None:
        def settled() -> bool:
            return ready() or self.error is not None or self.returncode is not None

        try:
            async with asyncio.timeout(within_s):
                async with self._changed:
                    await self._changed.wait_for(settled)
        except TimeoutError:
            raise GuestError(f"no {what} within {within_s:.0f} s", self.console) from None
        if self.error is not None:
            raise GuestError(f"the guest failed: {self.error}", self.console)
        if not ready():
            raise GuestError(f"qemu exited ({self.returncode}) before {what}", self.console)

    async def wait_booted(self, within_s: float) -> None:
        await self._wait(lambda: self.booted, within_s, "FERRY-BOOT")

    async def wait_synced(self, batch: int, within_s: float) -> None:
        """Until batch ``batch`` is durable on the guest's disk (its sync returned)."""
        await self._wait(lambda: self.synced >= batch, within_s, f"FERRY-SYNCED {batch}")

    async def wait_done(self, within_s: float) -> None:
        await self._wait(lambda: self.done, within_s, "FERRY-DONE")

    async def wait_exit(self, within_s: float) -> int:
        """Until QEMU exits (the guest powered off); its status, which must be 0."""
        try:
            async with asyncio.timeout(within_s):
                async with self._changed:
                    await self._changed.wait_for(lambda: self.returncode is not None)
        except TimeoutError:
            raise GuestError(f"qemu still running after {within_s:.0f} s", self.console) from None
        if self.error is not None:
            raise GuestError(f"the guest failed: {self.error}", self.console)
        assert self.returncode is not None
        if self.returncode != 0:
            raise GuestError(f"qemu exited with status {self.returncode}", self.console)
        return self.returncode

    async def proceed(self) -> None:
        """Let a ``step`` guest held after its last FERRY-SYNCED go on with the next batch."""
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write(b"go\n")
        await self._process.stdin.drain()

    async def kill(self) -> None:
        """Stop QEMU at once (SIGKILL by PID): to the disk, the machine lost power."""
        await self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT)

    async def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it lingers; then close the console log."""
        try:
            if not await self._signal_and_wait(signal.SIGTERM, STOP_TIMEOUT):
                await self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    async def _signal_and_wait(self, signum: int, within_s: float) -> bool:
        process, reader = self._process, self._reader
        if process is None or reader is None:
            return True
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)
        try:
            async with asyncio.timeout(within_s):
                await asyncio.shield(reader)
        except TimeoutError:
            return False
        return True


# -- exports for the guest's disk -----------------------------------------------------------------


@asynccontextmanager
async def qemu_nbd_export(image: Path, export: str = "disk") -> AsyncIterator[str]:
    """``image`` (raw) served read-write by qemu-nbd; yields its ``nbd://`` URL.

    The listening socket is ours, handed over by socket activation, so the URL
    works before qemu-nbd has even started: no waiting for it to listen.
    """
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        port = listener.getsockname()[1]
        fd = listener.fileno()
        script = 'exec 3<&"$0" && exec env LISTEN_PID=$$ LISTEN_FDS=1 "$@"'
        qemu_nbd = ["qemu-nbd", "-f", "raw", "-x", export, "--persistent", "--shared=8"]
        process = await asyncio.create_subprocess_exec(
            "bash",  # dash cannot redirect from a descriptor above 9
            "-c",
            script,
            str(fd),
            *qemu_nbd,
            "--cache=writeback",
            str(image),
            pass_fds=[fd],
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield f"nbd://127.0.0.1:{port}/{export}"
    finally:
        for signum in (signal.SIGTERM, signal.SIGKILL):
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT):
                    await process.wait()
