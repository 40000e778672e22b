"""The tests' view of bench/netns.py: the same namespaces, skipped where they cannot be made."""

import contextlib

import pytest

from bench.netns import NamespacesUnavailable, ensure_debian_tool, existing  # noqa: F401
from bench.netns import network as _network


@contextlib.contextmanager
def network(hosts: list[str]):
    try:
        with _network(hosts) as net:
            yield net
    except NamespacesUnavailable as exc:
        pytest.skip(str(exc))
