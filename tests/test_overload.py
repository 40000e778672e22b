"""Beyond capacity: new sessions get a prompt, retriable "overloaded" answer, and the sessions
already running keep their pace (time per token within 20 % of the unloaded figure)."""

import asyncio
import statistics
import time

from pipeline.client import DrafterClient
from pipeline.protocol import SledError
from tests.conftest import make_stack

CAPACITY = 4
PROMPTS = [[11, 12, 13], [21, 22], [31, 32, 33, 34], [41]]


async def running_pace(client) -> float:
    """Seconds per generated token over CAPACITY concurrent sessions."""
    started = time.perf_counter()
    results = await asyncio.gather(*[client.complete(p, 60) for p in PROMPTS])
    return (time.perf_counter() - started) / (sum(len(r.tokens) for r in results) / len(results))


async def flood(client, count):
    """New requests while the server is full: each must be refused quickly, as retriable."""
    refusals = []
    await asyncio.sleep(0.3)  # the running sessions are admitted first
    for _ in range(count):
        started = time.perf_counter()
        try:
            await client.complete([1, 2, 3], 5, timeout=10)
        except SledError as exc:
            assert exc.code == "overloaded" and exc.retriable
            refusals.append(time.perf_counter() - started)
        await asyncio.sleep(0.01)
    return refusals


async def test_overload_refuses_new_work_and_keeps_running_sessions_at_pace(tmp_path, tiny_models):
    drafters = {"busy": {"kind": "model", "model": str(tiny_models["small"]), "gamma": 3},
                "crowd": {"kind": "ngram", "gamma": 3}}
    stack = make_stack(tmp_path, tiny_models["target"], drafters,
                       **{"broker__max_sessions": CAPACITY, "broker__max_wait_ms": 20.0})
    async with stack:
        busy = DrafterClient(stack.config.drafter("busy").client)
        crowd = DrafterClient(stack.config.drafter("crowd").client)
        try:
            await running_pace(busy)  # warm-up
            unloaded = statistics.median([await running_pace(busy) for _ in range(3)])
            loaded, refusals = [], []
            for _ in range(3):
                pace, refused = await asyncio.gather(running_pace(busy), flood(crowd, 30))
                loaded.append(pace)
                refusals += refused
            loaded_pace = statistics.median(loaded)
        finally:
            busy.close()
            crowd.close()
    assert len(refusals) >= 45, "the flood should mostly meet a full server"
    assert statistics.median(refusals) < 0.5
    assert loaded_pace <= 1.2 * unloaded, f"{loaded_pace * 1000:.1f} ms/token loaded vs {unloaded * 1000:.1f} unloaded"
    print(f"overload: {len(refusals)} refusals, median {statistics.median(refusals) * 1000:.1f} ms; "
          f"running sessions {unloaded * 1000:.1f} -> {loaded_pace * 1000:.1f} ms/token")
