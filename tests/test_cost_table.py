"""``verifier.cost_table``: a verifier that reports a cost table's prices instead of its own compute
(workers/cost_table.py), so that the broker prices rows, and drafters draft, as on the table's
device. A real VerifierWorker (tiny target) on loopback sockets, a raw ROUTER playing the broker."""

import asyncio
import contextlib
import json
import time

import pytest
import zmq
import zmq.asyncio

from pipeline.protocol import BatchVerdicts, Inbox, Propose, Ready, VerifyBatch
from tests.conftest import tiny_llama
from tests.test_verifier_lifecycle import HISTORY, config_for
from workers.cost_table import target_prices
from workers.target import TargetVerifier
from workers.verifier import VerifierWorker


def table_for(model, path):
    """Test data, not a measurement: a forward costs 10 ms + 1 ms a session + 0.5 ms a row."""
    rows = [{"shape": "tiny", "backend": "eager", "sessions": b, "tokens_per_session": t, "ms": 10 + b + 0.5 * b * t}
            for b in (1, 4) for t in (1, 5)]
    shape = {"num_hidden_layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size}
    path.write_text(json.dumps({"card": "test", "backend": "eager", "rows": rows, "shapes": {"tiny": shape}}))
    return path


async def batch_costs(broker, identity, inbox, batches: list[VerifyBatch]) -> list[float]:
    costs = []
    for batch in batches:
        await broker.send_multipart([identity, batch.encode()])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            _, frame = await asyncio.wait_for(broker.recv_multipart(), 5)
            with contextlib.suppress(Exception):
                reply = inbox.decode(frame)
                if isinstance(reply, BatchVerdicts):
                    costs.append(reply.cost_ms)
                    break
    return costs


async def test_a_verifier_with_a_cost_table_reports_the_tables_price_of_each_verify_forward(tmp_path):
    model = tiny_llama(1)
    config = config_for(**{"verifier.cost_table": f'"{table_for(model, tmp_path / "gpu_cost_test.json")}"'})
    target = TargetVerifier(model, max_sessions=8, limits=config.limits)
    ctx = zmq.asyncio.Context()
    broker = ctx.socket(zmq.ROUTER)
    broker.linger = 0
    broker.bind(config.broker.backend)
    inbox = Inbox(Ready, BatchVerdicts)
    stop = asyncio.Event()
    # built as `sled verifier` builds it (workers/verifier.py serve): the prices from the table
    prices = target_prices(config.verifier.cost_table, model.config)
    worker = asyncio.create_task(VerifierWorker(config, target, ctx, prices).run(stop))
    try:
        while True:  # the verifier's Ready
            identity, frame = await asyncio.wait_for(broker.recv_multipart(), 5)
            with contextlib.suppress(Exception):
                if isinstance(inbox.decode(frame), Ready):
                    break
        costs = await batch_costs(broker, identity, inbox, [
            VerifyBatch(1, [Propose("a", 0, len(HISTORY), [1, 2], history=HISTORY)]),
            VerifyBatch(2, [Propose("a", 1, len(HISTORY) + 1, [3, 4, 5, 6]),
                            Propose("b", 0, len(HISTORY), [], history=HISTORY)]),
        ])
        # one session, 3 rows; then two sessions, 5 + 1 rows: the table's prices, not this CPU's time
        assert costs == [pytest.approx(10 + 1 + 0.5 * 3), pytest.approx(10 + 2 + 0.5 * 6)]
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker, 5)
        broker.close(0)
        ctx.destroy(0)


def test_a_cost_table_without_the_targets_shape_is_refused_with_its_reason(tmp_path):
    path = table_for(tiny_llama(1), tmp_path / "gpu_cost_test.json")
    with pytest.raises(ValueError, match="no shape with 3 layers"):
        target_prices(path, tiny_llama(1, layers=3).config)
    assert target_prices(path, tiny_llama(1).config).ms(4, 20) == pytest.approx(10 + 4 + 0.5 * 20)
