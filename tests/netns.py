"""The tests' view of bench/netns.py: the same namespaces, skipped where they cannot be made."""

import contextlib

import pytest

from bench.netns import ensure_debian_tool, existing, network as _network, NamespacesUnavailable  # noqa: F401


@contextlib.contextmanager
def network(hosts: list[str]):
    try:
        with _network(hosts) as net:
            yield net
    except NamespacesUnavailable as exc:
        pytest.skip(str(exc))
