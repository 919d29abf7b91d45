"""A loopback TCP proxy that delays each direction by half a round-trip time: the bench puts
one in front of each model service to measure a stack as if its parts were on different
machines (`specd bench --rtt-ms 0,2,10,30`).

Each chunk read from one side is written to the other `rtt / 2` after it arrived, in order,
whatever else is in flight: a delay line, not a rate limit, so a pipelined caller's calls
overlap in the network as they would on a real link. The delay can be changed while the
proxy runs; it applies to chunks that arrive afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

log = logging.getLogger(__name__)

CHUNK = 1 << 16


class DelayProxy:
    """Listens on host:port (0 = a free port) and forwards every connection to `upstream`."""

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0) -> None:
        up_host, _, up_port = upstream.rpartition(":")
        self.upstream = (up_host, int(up_port))
        self.host = host
        self.port = port
        self.one_way_seconds = 0.0
        self._server: asyncio.base_events.Server | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def set_rtt_ms(self, rtt_ms: float) -> None:
        self.one_way_seconds = max(0.0, rtt_ms) / 2000.0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError as err:
            log.debug("proxy %s: upstream %s:%d refused: %s", self.address, *self.upstream, err)  # not up yet
            client_w.close()
            return
        pumps = [asyncio.ensure_future(self._pump(client_r, server_w)), asyncio.ensure_future(self._pump(server_r, client_w))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            for writer in (client_w, server_w):
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Reads as fast as the sender sends; a second task writes each chunk when it is due."""
        line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await line.get()
                if not chunk:
                    return
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                chunk = await reader.read(CHUNK)
                line.put_nowait((time.perf_counter() + self.one_way_seconds, chunk))
                if not chunk:
                    break
            await sender
        finally:
            sender.cancel()


class DelayProxies:
    """Proxies for several upstreams, served by one event loop on a thread of their own."""

    def __init__(self, upstreams: dict[str, str], ports: dict[str, int] | None = None) -> None:
        """`ports` names the port each proxy listens on (0 or absent: a free one)."""
        ports = ports or {}
        self.proxies = {name: DelayProxy(address, port=ports.get(name, 0)) for name, address in upstreams.items()}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxies", daemon=True)
        self._thread.start()
        for proxy in self.proxies.values():
            asyncio.run_coroutine_threadsafe(proxy.start(), self._loop).result(timeout=10)

    def address(self, name: str) -> str:
        return self.proxies[name].address

    def set_rtt_ms(self, rtt_ms: float) -> None:
        for proxy in self.proxies.values():
            proxy.set_rtt_ms(rtt_ms)  # one float: read by the proxy thread for chunks arriving next

    def close(self) -> None:
        for proxy in self.proxies.values():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(proxy.stop(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
