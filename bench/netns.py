"""Several "hosts" on one machine: Linux network namespaces joined by veth pairs to a bridge.

Used by the tests that cross a network and by the benchmarks' emulated edge fleet (bench/fleet.py).
Every namespace here is created by the run that uses it and deleted by it: a private
"switch" namespace holds the bridge, and each host namespace has one veth end (``eth0``) with
its own address in ``10.231.7.0/24`` plus an ``/etc/hosts`` naming every host, so processes
reach each other by name as containers of a compose stack do. The root namespace gets no
interface and no address, and no packet leaves the namespaces.

Names carry the creating process's pid (``sledt-PID-TAG-HOST``) so that namespaces left by a
run that was killed can be found and removed by the next one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "sledt"
SUBNET = "10.231.7"  # /24, private, only ever configured inside our own namespaces
NETNS_ETC = Path("/etc/netns")  # `ip netns exec NS` bind-mounts /etc/netns/NS/* over /etc/*


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def ensure_debian_tool(binary: str, package: str) -> str | None:
    """The path of ``binary``; when missing and we are root on Debian, apt-get installs ``package``
    first (`make test` does the same). None when it cannot be had."""
    found = shutil.which(binary)
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        done = subprocess.run(["apt-get", "install", "-y", "-q", package], capture_output=True, env=env, timeout=600)
    except subprocess.TimeoutExpired:
        return None
    return shutil.which(binary) if done.returncode == 0 else None


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if ensure_debian_tool("ip", "iproute2") is None:
        return "the `ip` command (Debian package iproute2) is missing"
    probe = f"{PREFIX}-{os.getpid()}-probe{secrets.token_hex(2)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


def remove_stale() -> list[str]:
    """Delete namespaces (and their /etc/netns folders) left by test runs whose process is gone."""
    listing = _ip("netns", "list", check=False).stdout.split("\n")
    removed = []
    for line in listing:
        name = line.split(" ")[0]
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
            continue
        if Path(f"/proc/{parts[1]}").exists():
            continue  # its creator still runs (perhaps in parallel with us)
        _ip("netns", "delete", name, check=False)
        shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
        removed.append(name)
    return removed


class NamespacesUnavailable(RuntimeError):
    pass


@dataclass
class Host:
    name: str  # the host name other hosts use (as a compose service name)
    netns: str
    address: str


@dataclass
class Network:
    """A bridge in its own namespace and one namespace per host; ``up()``, then ``down()`` always."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    hosts: dict[str, Host] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)

    def _ns(self, label: str) -> str:
        return f"{PREFIX}-{os.getpid()}-{self.tag}-{label}"

    @property
    def switch(self) -> str:
        return self._ns("switch")

    def add_host(self, name: str) -> Host:
        host = Host(name, self._ns(name), f"{SUBNET}.{len(self.hosts) + 1}")
        self.hosts[name] = host
        return host

    def up(self) -> None:
        self._add_netns(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(f"{h.address} {h.name}\n" for h in self.hosts.values())
        for index, host in enumerate(self.hosts.values()):
            self._add_netns(host.netns)
            port = f"p{index}"  # lives in the switch namespace only, so short names never clash
            _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            (NETNS_ETC / host.netns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / host.netns / "hosts").write_text(hosts_file)

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.created.append(name)

    def command(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run on ``host``: in its namespace, with its /etc/hosts."""
        return ["ip", "netns", "exec", self.hosts[host].netns, *argv]

    def down(self) -> list[str]:
        """Delete every namespace this network made (their veths go with them); the names that
        could not be deleted."""
        left = []
        for name in reversed(self.created):
            if _ip("netns", "delete", name, check=False).returncode != 0:
                left.append(name)
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
        self.created.clear()
        if NETNS_ETC.is_dir() and not any(NETNS_ETC.iterdir()):
            NETNS_ETC.rmdir()  # ip(8) makes it on demand
        return left


def existing() -> list[str]:
    """Namespaces of this module's naming scheme that exist now."""
    return [line.split(" ")[0] for line in _ip("netns", "list", check=False).stdout.splitlines()
            if line.startswith(f"{PREFIX}-")]


def shape_link(net: Network, host: str, rate_mbit: float) -> None:
    """Cap a host's link at ``rate_mbit`` both ways with a token-bucket filter (tbf): on its
    ``eth0`` (uplink) and on its port of the switch (downlink). tbf, not netem: this kernel has
    no netem; delay is added in user space (bench/linkproxy.py)."""
    index = list(net.hosts).index(host)
    rate = f"{rate_mbit}mbit"
    # burst must hold at least one MTU-sized frame per timer tick; 32 kB is plenty up to ~1 Gbit/s
    for ns, dev in ((net.hosts[host].netns, "eth0"), (net.switch, f"p{index}")):
        _ip_tc(ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "32kb", "latency", "50ms")


def _ip_tc(netns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "tc", *args], capture_output=True, text=True, timeout=30, check=True)


@contextlib.contextmanager
def network(hosts: list[str]):
    """A Network with these hosts, up for the block and always torn down. Raises
    NamespacesUnavailable where namespaces cannot be made (not root, no `ip`)."""
    reason = unavailable_reason()
    if reason:
        raise NamespacesUnavailable(reason)
    remove_stale()
    net = Network()
    for name in hosts:
        net.add_host(name)
    try:
        net.up()
        yield net
    finally:
        left = net.down()
        assert not left, f"namespaces left behind: {left}"
