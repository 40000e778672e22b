"""An edge link's delay, in user space: a TCP proxy that holds every chunk for a fixed one-way delay.

This kernel has no netem, so the emulated fleet (bench/fleet.py) puts one of these in front of
the broker for each device class: devices connect to it across their veth (whose bandwidth tbf
caps), it forwards to the broker. Each direction keeps a queue of (due time, chunk): a chunk is
written once its own delay has passed, so chunks in flight overlap as on a real link, and order
is kept. (The `faulty` package, checked first, sleeps inline per chunk: a chunk that arrives
while the one before it waits is delayed by both, so sixteen sessions sharing one connection
would see up to sixteen delays.) It counts the bytes each way, the figure "bytes on the network
per token" comes from, and writes them to a JSON file twice a second.

    python -m bench.linkproxy --listen 10.231.7.1:7001 --upstream unix:/tmp/x/front.sock --delay-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path

MAX_QUEUED_CHUNKS = 4096  # per direction; a full queue stops reading, so TCP pushes back


class DelayProxy:
    def __init__(self, upstream: str, delay_s: float):
        self.upstream = upstream
        self.delay_s = delay_s
        self.counts = {"connections": 0, "bytes_up": 0, "bytes_down": 0}

    async def _connect(self):
        if self.upstream.startswith("unix:"):
            return await asyncio.open_unix_connection(self.upstream.removeprefix("unix:"))
        host, port = self.upstream.rsplit(":", 1)
        return await asyncio.open_connection(host, int(port))

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: str) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(MAX_QUEUED_CHUNKS)

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                if chunk is None:
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()

        delivery = asyncio.create_task(deliver())
        try:
            with contextlib.suppress(ConnectionError, OSError):
                while chunk := await reader.read(65536):
                    self.counts[key] += len(chunk)
                    await queue.put((loop.time() + self.delay_s, chunk))
                await queue.put((0.0, None))
                await delivery
        finally:
            delivery.cancel()
            writer.close()

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.counts["connections"] += 1
        try:
            up_r, up_w = await asyncio.wait_for(self._connect(), 5)
        except (OSError, TimeoutError):
            client_w.close()
            return
        await asyncio.gather(self.pump(client_r, up_w, "bytes_up"), self.pump(up_r, client_w, "bytes_down"))

    async def serve(self, listen: str, stats_file: Path | None, stop: asyncio.Event) -> None:
        host, port = listen.rsplit(":", 1)
        server = await asyncio.start_server(self.handle, host, int(port))
        print("listening", flush=True)
        async with server:
            while not stop.is_set():
                if stats_file:
                    self.write_stats(stats_file)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
        if stats_file:
            self.write_stats(stats_file)

    def write_stats(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.counts))
        tmp.replace(path)  # readers never see half a file


def read_stats(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"connections": 0, "bytes_up": 0, "bytes_down": 0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True, help="HOST:PORT to accept devices on")
    p.add_argument("--upstream", required=True, help="HOST:PORT or unix:PATH of the broker's frontend")
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay added to each direction")
    p.add_argument("--stats-file", type=Path)
    args = p.parse_args()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await DelayProxy(args.upstream, args.delay_ms / 1000).serve(args.listen, args.stats_file, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
