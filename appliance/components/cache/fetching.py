"""Chunks a cached disk misses, fetched from the on-prem current image.

One fetch per chunk at once, however many readers and writers wait for it;
the adjacent missed chunks of one read claimed together and fetched with
one upstream read of up to ``MISS_RUN`` bytes; each fetched chunk kept clean
in a slot when one can be had (reads never wait for room). A write that
gives a chunk a new slot while it is being fetched *overtakes* the fetch
(``overtake``): the fetched bytes are stale, so they are neither kept nor,
for a fetch that must return the chunk's content, returned (it fetches
again). Part of :class:`~appliance.components.cache.disk.CacheDisk`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator

from appliance.components.cache.pieces import Piece
from appliance.components.cache.store import CacheStore
from appliance.components.cache.upstream import Upstream

MISS_RUN = 4 << 20
"""Adjacent missed chunks are fetched with one upstream read of up to this many bytes."""


class ChunkFetcher:
    """The fetching half of a cached disk (see the module)."""

    def __init__(
        self,
        store: CacheStore,
        upstream: Upstream,
        reclaim: Callable[[], Awaitable[bool]],
        read_local: Callable[[Piece, memoryview], bool],
    ) -> None:
        self.store = store
        self.upstream = upstream
        self._reclaim = reclaim
        self._read_local = read_local
        """Serves a piece from the cache if it can (a write may have landed meanwhile)."""
        self._chunk = store.geometry.chunk_size
        self._size = store.geometry.disk_size
        self._miss_run = max(1, MISS_RUN // self._chunk)
        self._fetches: dict[int, asyncio.Future[bytes]] = {}
        self._watch: dict[int, list[int]] = {}
        """Chunks being fetched: [writes that gave it a new slot, watchers]."""

    def chunk_length(self, chunk: int) -> int:
        return min(self._chunk, self._size - chunk * self._chunk)

    def overtake(self, chunk: int) -> None:
        """A write gave ``chunk`` a new slot: a fetch of it under way is stale."""
        watch = self._watch.get(chunk)
        if watch is not None:
            watch[0] += 1

    async def read_misses(self, misses: list[Piece], out: memoryview) -> None:
        """Fill the missed pieces: adjacent chunks nobody is fetching yet are claimed (one
        fetch per chunk at once, as in ``fetch``) and fetched as one upstream read of up
        to ``MISS_RUN`` bytes; the others wait for the fetch under way."""
        loop = asyncio.get_running_loop()
        runs: list[list[int]] = []
        for piece in misses:  # no await until every claim is made
            if piece.chunk in self._fetches:
                continue
            self._fetches[piece.chunk] = loop.create_future()
            if runs and runs[-1][-1] + 1 == piece.chunk and len(runs[-1]) < self._miss_run:
                runs[-1].append(piece.chunk)
            else:
                runs.append([piece.chunk])
        futures = {piece.chunk: self._fetches[piece.chunk] for piece in misses}

        async def fill(piece: Piece) -> None:
            fetched = await asyncio.shield(futures[piece.chunk])
            if not self._read_local(piece, out):  # a write may have landed since
                out[piece.at : piece.at + piece.length] = fetched[
                    piece.start : piece.start + piece.length
                ]

        await asyncio.gather(
            *(self._fetch_run(run) for run in runs), *(fill(piece) for piece in misses)
        )

    async def _fetch_run(self, chunks: list[int]) -> None:
        """Fetch claimed adjacent ``chunks`` with one upstream read, keep each clean and
        settle its future; the claims are released whatever happens."""
        futures = [self._fetches[chunk] for chunk in chunks]
        try:
            await self._fetch_run_current(chunks, futures)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except BaseException as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # retrieved: waiters that left need not see it logged
            raise
        finally:
            for chunk, future in zip(chunks, futures, strict=True):
                if self._fetches.get(chunk) is future:
                    del self._fetches[chunk]

    async def _fetch_run_current(
        self, chunks: list[int], futures: list[asyncio.Future[bytes]]
    ) -> None:
        """One read of the run; a chunk a write overtook meanwhile is fetched again alone."""
        length = sum(self.chunk_length(chunk) for chunk in chunks)
        with contextlib.ExitStack() as watching:
            watches = [watching.enter_context(self.watching(chunk)) for chunk in chunks]
            data = await self.upstream.read(chunks[0] * self._chunk, length)
            for index, chunk in enumerate(chunks):
                overtaken = watches[index]
                if overtaken():
                    content = await self._fetch_current(chunk, keep=True)
                else:
                    at = index * self._chunk
                    content = data[at : at + self._chunk].ljust(self._chunk, b"\0")
                    await self._keep_clean(chunk, content, overtaken)
                futures[index].set_result(content)

    async def fetch(self, chunk: int, *, keep: bool = True) -> bytes:
        """The chunk's on-prem content (padded to a whole chunk); one fetch per chunk at once.

        ``keep``: kept clean in a slot (for reads). A write that fetches its chunk
        writes the merged content into a slot of its own instead: keeping a clean
        copy first would cost a second slot, a second 64 KiB write and a record."""
        future = self._fetches.get(chunk)
        if future is not None:
            return await asyncio.shield(future)
        future = asyncio.get_running_loop().create_future()
        self._fetches[chunk] = future
        try:
            data = await self._fetch_current(chunk, keep=keep)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters that left need not see it logged
            raise
        finally:
            del self._fetches[chunk]
        future.set_result(data)
        return data

    async def _fetch_current(self, chunk: int, *, keep: bool) -> bytes:
        """Fetch until no write to the chunk overtook the fetch, then keep it clean."""
        while True:
            with self.watching(chunk) as overtaken:
                data = await self.upstream.read(chunk * self._chunk, self.chunk_length(chunk))
                if overtaken():
                    continue  # written (and maybe committed and evicted) meanwhile: stale
                data = data.ljust(self._chunk, b"\0")
                if keep:
                    await self._keep_clean(chunk, data, overtaken)
                return data

    async def _keep_clean(self, chunk: int, data: bytes, overtaken: Callable[[], bool]) -> None:
        if chunk in self.store.live:
            return
        slot = self.store.allocate()
        if slot is None and await self._reclaim():
            slot = self.store.allocate()
        if slot is None:
            return  # served without keeping it: reads never wait for room
        if chunk in self.store.live or overtaken():
            self.store.unused(slot)  # a write landed while we reclaimed
            return
        self.store.write_slot(slot, 0, data)
        self.store.map(chunk, slot, 0)

    @contextlib.contextmanager
    def watching(self, chunk: int) -> Iterator[Callable[[], bool]]:
        """While inside, the callable tells whether a write gave the chunk a new slot.

        Only chunks someone is fetching are watched, so this costs nothing per
        chunk otherwise.
        """
        watch = self._watch.setdefault(chunk, [0, 0])  # [writes seen, watchers]
        watch[1] += 1
        seen = watch[0]
        try:
            yield lambda: watch[0] != seen
        finally:
            watch[1] -= 1
            if not watch[1]:
                del self._watch[chunk]
