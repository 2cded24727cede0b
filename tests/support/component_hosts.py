"""The data-plane components as child processes a test can SIGKILL, with a tiny RPC each.

    onprem = HostProcess("onprem", [...], tmp_path / "onprem.err")
    port = int((await onprem.start())[0])          # NBD port of the I/O manager
    await onprem.call({"op": "arm", "epoch": 3, "step": "commit_recorded"})
    await onprem.paused()                           # the commit is held at that step
    await onprem.kill()                             # SIGKILL

The hosts themselves are in ``host_main`` (``python -m tests.support.host_main``).
The RPC is one JSON line per request on a Unix socket, one connection per call:
``{"op": ...}`` answered by ``{"ok": value}`` or ``{"error": type, "fields": {...}}``.
Errors the cache's shipper must tell apart come back as their own types.

``RpcOnprem`` reaches an I/O manager host with the two calls the cache's
epoch sink needs (``stage_export``, ``commit_epoch``): a DirectEpochSink in the
cache host wraps it. A dead host is an ``OSError`` (the shipper retries).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from appliance.components.onprem import EpochManifest, ManifestEntry
from appliance.datapath.nbd.channel import NbdAddress, TcpAddress
from appliance.errors import EpochOutOfOrder, EpochRejected, StaleToken

REPO = Path(__file__).resolve().parents[2]
PREFIX = "@@"
"""Lines a host prints for the test start with this (logs go to stderr)."""
START_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 60.0


class RemoteError(RuntimeError):
    """An error raised in a host that has no typed counterpart here."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def encode_error(exc: Exception) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if isinstance(exc, EpochOutOfOrder):
        fields = {"disk_id": exc.disk_id, "epoch": exc.epoch, "expected": exc.expected}
    elif isinstance(exc, StaleToken):
        fields = {"disk_id": exc.disk_id, "token": exc.token, "highest": exc.highest}
    elif isinstance(exc, EpochRejected):
        fields = {"disk_id": exc.disk_id, "epoch": exc.epoch, "reason": exc.reason}
    return {"error": type(exc).__name__, "message": str(exc), "fields": fields}


def decode_error(answer: dict[str, Any]) -> Exception:
    kind, fields = answer["error"], answer.get("fields", {})
    if kind == "EpochOutOfOrder":
        return EpochOutOfOrder(fields["disk_id"], fields["epoch"], fields["expected"])
    if kind == "StaleToken":
        return StaleToken(fields["disk_id"], fields["token"], fields["highest"])
    if kind == "EpochRejected":
        return EpochRejected(fields["disk_id"], fields["epoch"], fields["reason"])
    return RemoteError(kind, answer.get("message", ""))


async def call(socket_path: Path, request: dict[str, Any], limit_s: float = CALL_TIMEOUT_S) -> Any:
    """One request to the host listening on ``socket_path``; its answer, or its error raised."""
    async with asyncio.timeout(limit_s):
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
    if not line:
        raise ConnectionResetError(f"host at {socket_path} closed the call {request['op']}")
    answer = json.loads(line)
    if "error" in answer:
        raise decode_error(answer)
    return answer["ok"]


def manifest_to_json(manifest: EpochManifest) -> dict[str, Any]:
    return {
        "entries": [[e.offset, e.length, e.hash.hex()] for e in manifest.entries],
        "digest": manifest.digest.hex(),
    }


def manifest_from_json(document: dict[str, Any]) -> EpochManifest:
    entries = tuple(
        ManifestEntry(int(offset), int(length), bytes.fromhex(digest))
        for offset, length, digest in document["entries"]
    )
    return EpochManifest(entries, bytes.fromhex(document["digest"]))


class RpcOnprem:
    """An I/O manager host's ``stage_export`` and ``commit_epoch``, over its RPC socket."""

    def __init__(self, socket_path: Path) -> None:
        self._socket = socket_path

    async def stage_export(self, disk_id: str, epoch: int, token: int) -> tuple[NbdAddress, str]:
        request = {"op": "stage", "disk_id": disk_id, "epoch": epoch, "token": token}
        host, port, export = await call(self._socket, request)
        return TcpAddress(host, port), export

    async def commit_epoch(
        self, disk_id: str, epoch: int, token: int, manifest: EpochManifest
    ) -> None:
        request = {
            "op": "commit",
            "disk_id": disk_id,
            "epoch": epoch,
            "token": token,
            "manifest": manifest_to_json(manifest),
        }
        await call(self._socket, request)


class HostProcess:
    """One host child process: started, called, SIGKILLed, started again (same arguments)."""

    def __init__(self, kind: str, args: list[str], socket_path: Path, stderr_path: Path) -> None:
        self.kind = kind
        self.socket = socket_path
        self.args = args
        self._stderr_path = stderr_path
        self._process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.kills = 0

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> list[str]:
        """Start the host; the fields of its READY line."""
        if self.running:
            raise RuntimeError(f"{self.kind} host is already running")
        with self._stderr_path.open("ab") as stderr:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.support.host_main",
                self.kind,
                "--socket",
                str(self.socket),
                *self.args,
                cwd=REPO,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.starts += 1
        return await self.expect("READY", START_TIMEOUT_S)

    async def expect(self, word: str, limit_s: float = CALL_TIMEOUT_S) -> list[str]:
        """Wait for the host's next ``word`` line; its fields."""
        process = self._process
        assert process is not None and process.stdout is not None
        async with asyncio.timeout(limit_s):
            while True:
                line = (await process.stdout.readline()).decode()
                if not line:
                    raise AssertionError(f"{self.kind} host exited: see {self._stderr_path}")
                if line.startswith(PREFIX):
                    fields = line[len(PREFIX) :].split()
                    if fields[0] == word:
                        return fields[1:]

    async def paused(self) -> list[str]:
        """Wait until an armed commit step holds: (epoch, step)."""
        return await self.expect("PAUSED")

    async def call(self, request: dict[str, Any], limit_s: float = CALL_TIMEOUT_S) -> Any:
        return await call(self.socket, request, limit_s)

    async def kill(self) -> None:
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
        await process.wait()
        self._process = None
        self.kills += 1

    async def stop(self) -> None:
        await self.kill()
