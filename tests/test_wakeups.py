"""The two places where the broker relies on being woken: the timerfd that ends a batch's wait
on its deadline (brokers/clock.py PreciseClock) and the edge-triggered ZMQ_FD re-check of
pipeline/sockets.py LoopSocket."""

import asyncio
import time

import pytest
import zmq
import zmq.asyncio

from brokers.clock import _TIMERFD, PreciseClock
from brokers.clock import MonotonicClock
from pipeline.sockets import LoopSocket

needs_timerfd = pytest.mark.skipif(_TIMERFD is None, reason="no timerfd on this platform")


@needs_timerfd
async def test_precise_clock_ends_a_wait_by_its_timerfd_never_early():
    """A wait with nothing else to wake it is ended by the timerfd (it sets the waiter's event,
    so wait() returns True), where the loop's own timer, rounded up to a whole millisecond,
    returns False; neither ends before the deadline."""
    precise, plain = PreciseClock(), MonotonicClock()
    try:
        for _ in range(5):
            start = time.monotonic()
            assert await precise.wait(asyncio.Event(), 0.0043) is True
            assert time.monotonic() - start >= 0.0043
            start = time.monotonic()
            assert await plain.wait(asyncio.Event(), 0.0043) is False
            assert time.monotonic() - start >= 0.0043
        # disarmed after each wait: a later wait on a set event returns at once, nothing pending
        event = asyncio.Event()
        event.set()
        assert await precise.wait(event, 10.0) is True
    finally:
        precise.close()


@needs_timerfd
async def test_precise_clock_returns_when_the_event_is_set_first():
    clock = PreciseClock()
    try:
        event = asyncio.Event()
        asyncio.get_running_loop().call_later(0.01, event.set)
        start = time.monotonic()
        assert await clock.wait(event, 5.0) is True
        assert time.monotonic() - start < 2.0
    finally:
        clock.close()


async def test_loop_socket_reads_a_message_whose_edge_a_send_consumed():
    """ZMQ_FD is edge-triggered and a send may consume the edge of a message that arrived just
    before it: the waiting receiver must still get the message (the scheduled ZMQ_EVENTS
    re-check), not sleep until the next one."""
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    try:
        router.bind("inproc://wakeups")
        dealer.setsockopt(zmq.IDENTITY, b"d")
        dealer.connect("inproc://wakeups")
        loop_socket = LoopSocket(dealer)
        loop_socket.send(b"hello")  # the router learns the dealer's identity
        assert (await asyncio.wait_for(router.recv_multipart(), 2.0)) == [b"d", b"hello"]
        for i in range(20):
            receiver = asyncio.ensure_future(loop_socket.recv_multipart())
            await asyncio.sleep(0)  # the receiver now sleeps on the fd
            router.send_multipart([b"d", b"reply %d" % i])
            time.sleep(0.005)  # (blocking on purpose) the reply is in the dealer's pipe, edge raised
            loop_socket.send(b"ping %d" % i)  # a call into the socket that may consume the edge
            assert await asyncio.wait_for(receiver, 2.0) == [b"reply %d" % i]
            assert (await asyncio.wait_for(router.recv_multipart(), 2.0)) == [b"d", b"ping %d" % i]
        loop_socket.close()
    finally:
        dealer.close(0)
        router.close(0)
        ctx.term()
