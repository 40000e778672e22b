"""A user-space TCP proxy that makes a link bad: per-chunk jitter, stalls and connection resets.

The kernel here has no netem, so delay is injected above TCP: every chunk read from one side is
held for a random delay before it is written to the other (order is kept per direction), now
and then a direction stalls for a while, and every ``reset_every_s`` all open connections are
aborted (RST). Run inside an edge device's namespace:

    python tests/faultproxy.py --listen 127.0.0.1:7000 --upstream 10.231.7.1:5555 --jitter-ms 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import struct
import sys


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], jitter_s: float, stall_p: float, stall_s: float,
                 reset_every_s: float, seed: int):
        self.upstream = upstream
        self.jitter_s = jitter_s
        self.stall_p = stall_p
        self.stall_s = stall_s
        self.reset_every_s = reset_every_s
        self.rng = random.Random(seed)
        self.open: set[asyncio.StreamWriter] = set()
        self.counts = {"connections": 0, "resets": 0, "stalls": 0, "chunks": 0}

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(65536):
                self.counts["chunks"] += 1
                delay = self.rng.uniform(0, self.jitter_s)
                if self.rng.random() < self.stall_p:
                    self.counts["stalls"] += 1
                    delay += self.stall_s
                await asyncio.sleep(delay)
                writer.write(chunk)
                await writer.drain()
        writer.close()

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.counts["connections"] += 1
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 5)
        except (OSError, TimeoutError):
            client_w.close()
            return
        self.open |= {client_w, up_w}
        try:
            await asyncio.gather(self.pump(client_r, up_w), self.pump(up_r, client_w))
        finally:
            self.open -= {client_w, up_w}

    def _abort(self, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:  # linger 0: close() sends RST, as a dropped NAT entry or a crash would
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def resets(self) -> None:
        while self.reset_every_s > 0:
            await asyncio.sleep(self.reset_every_s)
            if self.open:
                self.counts["resets"] += 1
            for writer in list(self.open):
                self._abort(writer)
            # a snapshot after each reset: the counts survive even if the proxy is killed, not stopped
            print(json.dumps(self.counts), flush=True)

    async def serve(self, host: str, port: int, seconds: float) -> None:
        server = await asyncio.start_server(self.handle, host, port)
        print("listening", flush=True)
        task = asyncio.create_task(self.resets())
        async with server:
            await asyncio.sleep(seconds)
        task.cancel()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--jitter-ms", type=float, default=50)
    p.add_argument("--stall-p", type=float, default=0.01)
    p.add_argument("--stall-ms", type=float, default=800)
    p.add_argument("--reset-every-s", type=float, default=3.0)
    p.add_argument("--seconds", type=float, default=120)  # stops by itself
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    host, port = args.listen.rsplit(":", 1)
    up_host, up_port = args.upstream.rsplit(":", 1)
    proxy = FaultProxy((up_host, int(up_port)), args.jitter_ms / 1000, args.stall_p, args.stall_ms / 1000,
                       args.reset_every_s, args.seed)
    try:
        asyncio.run(proxy.serve(host, int(port), args.seconds))
    except KeyboardInterrupt:
        pass
    print(json.dumps(proxy.counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
