"""Who may talk to which socket: CurveZMQ with per-role allow-lists, and no plain socket off loopback.

Keys are pyzmq certificate files made by ``sled keys generate NAME``: ``NAME.key`` (public)
and ``NAME.key_secret`` in ``security.keys_dir``. A public key is authorised for one role by
filing it in that role's allow-list, ``authorized/ROLE/NAME.key`` (``--authorize --role ROLE``).
Every CURVE socket authenticates through its own ZAP domain, which admits only some roles:

  frontend (broker, drafters connect)   drafter, admin
  backend  (broker, verifiers connect)  verifier
  client   (a drafter's local apps)     admin, client

so an edge device's key, the least trusted in the system, cannot register as a verifier and
read other devices' prompts. A refused handshake is logged with the key's name (when the key is
known here) and fingerprint, and counted by reason: ``unauthorised`` (a key on no allow-list,
or a peer without CURVE) or ``wrong_role`` (a key allowed on another socket only).

Without CURVE no role binds a ZeroMQ socket off loopback (``ipc://`` is fine): the role exits
at once naming ``security.allow_insecure``, which overrides the check and is warned about at
every start. With CURVE on, a session belongs to the public key that opened it.

The allow-lists are read once, at start. Keys filed directly in ``authorized/`` (the layout
before roles) are not honoured: a process that finds one refuses to start and names the
``sled keys authorize NAME --role ROLE`` command that files it under a role.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import structlog
import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.asyncio import AsyncioAuthenticator

from pipeline.config import Config

log = structlog.get_logger("sled.security")

ROLES = ("drafter", "verifier", "admin", "client")
FRONTEND, BACKEND, CLIENT = "frontend", "backend", "client"
DOMAIN_ROLES = {FRONTEND: ("drafter", "admin"), BACKEND: ("verifier",), CLIENT: ("admin", "client")}
UNAUTHORISED, WRONG_ROLE = "unauthorised", "wrong_role"
REFUSAL_LOG_INTERVAL_S = 10.0  # a refused peer retries every few hundred ms: log it once per interval


class InsecureConfig(Exception):
    """A setting would expose a socket without authentication; the role refuses to start."""


@dataclass(frozen=True)
class CurveKeys:
    public: bytes
    secret: bytes
    server_public: bytes | None = None  # set on clients: the public key of the socket they connect to
    domain: str | None = None  # set on servers: the ZAP domain (allow-list) of the socket

    def apply(self, sock: zmq.Socket, *, server: bool) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        if server:
            sock.curve_server = True
            if self.domain:
                sock.zap_domain = self.domain.encode()
        else:
            sock.curve_serverkey = self.server_public


def keys_dir(config: Config) -> Path:
    return Path(config.security.keys_dir)


def authorized_dir(config: Config) -> Path:
    return Path(config.security.authorized_dir) if config.security.authorized_dir else keys_dir(config) / "authorized"


def fingerprint(public_z85: bytes | str) -> str:
    raw = zmq.utils.z85.decode(public_z85.encode() if isinstance(public_z85, str) else public_z85)
    return hashlib.sha256(raw).hexdigest()[:16]


def _load(config: Config, name: str) -> tuple[bytes, bytes]:
    path = keys_dir(config) / f"{name}.key_secret"
    if not path.is_file():
        raise FileNotFoundError(f"no key pair {path}: run `sled keys generate {name}`")
    public, secret = zmq.auth.load_certificate(path)
    return public, secret


def _public(config: Config, name: str) -> bytes:
    path = keys_dir(config) / f"{name}.key"
    if not path.is_file():
        raise FileNotFoundError(f"no public key {path}: copy it from the host that made it (`sled keys bundle`)")
    return zmq.auth.load_certificate(path)[0]


def server_keys(config: Config, domain: str = FRONTEND) -> CurveKeys | None:
    if not config.security.curve:
        return None
    return CurveKeys(*_load(config, config.security.server_key), domain=domain)


def client_keys(config: Config, name: str) -> CurveKeys | None:
    """A peer's keys for connecting to the broker, or None when CURVE is off."""
    if not config.security.curve:
        return None
    return CurveKeys(*_load(config, name), _public(config, config.security.server_key))


# --- binds ---------------------------------------------------------------------------------

def is_local(endpoint: str) -> bool:
    """True for ipc:// and inproc:// endpoints and tcp:// on a loopback address (or localhost)."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a wildcard (*), an interface name or a host name: reachable from elsewhere


def check_bind(config: Config, endpoint: str, setting: str, *, curve: bool, warn: bool = True) -> None:
    """Refuse a plain (non-CURVE) socket bound off loopback unless security.allow_insecure is set."""
    if curve or is_local(endpoint):
        return
    if not config.security.allow_insecure:
        raise InsecureConfig(
            f"{setting} = {endpoint!r} binds a non-loopback address without CURVE: anyone who can reach it could "
            f"join unauthenticated. Turn security.curve on with role keys (docs/deployment.md, Keys), bind 127.0.0.1 "
            f"or ipc://, or set security.allow_insecure = true to accept the risk")
    if warn:
        log.warning("insecure_bind", setting=setting, endpoint=endpoint,
                    detail="security.allow_insecure is set: this socket takes unauthenticated peers from the network")


def check_gateway(config: Config) -> None:
    """The REST gateway listens off loopback only with API keys (or security.allow_insecure)."""
    g = config.gateway
    if g.api_keys or is_local(f"tcp://{g.host}:{g.port}" if ":" not in g.host else f"tcp://[{g.host}]:{g.port}"):
        return
    if not config.security.allow_insecure:
        raise InsecureConfig(
            f"gateway.host = {g.host!r} listens off loopback with no gateway.api_keys: anyone who can reach it could "
            f"generate. Set gateway.api_keys, listen on 127.0.0.1, or set security.allow_insecure = true")
    log.warning("insecure_listen", setting="gateway.host", host=g.host,
                detail="security.allow_insecure is set: the gateway serves anyone without an API key")


def drafter_client_curve(config: Config, name: str, *, warn: bool = True) -> CurveKeys | None:
    """The drafter's client socket: plain on loopback or ipc, CURVE (admin and client keys) elsewhere.
    Raises InsecureConfig for a plain socket off loopback (unless security.allow_insecure)."""
    cfg = config.drafter(name)
    if is_local(cfg.client):
        return None
    check_bind(config, cfg.client, f"drafters.{name}.client", curve=config.security.curve, warn=warn)
    if not config.security.curve:
        return None
    return CurveKeys(*_load(config, cfg.key or name), domain=CLIENT)


def drafter_keys_for_client(config: Config, name: str, endpoint: str | None = None,
                            key: str | None = None) -> CurveKeys | None:
    """An app's (or operator tool's) keys for drafter NAME's client socket, when it serves CURVE.
    ``endpoint``: the drafter's bind endpoint (default: drafters.NAME.client as configured here);
    ``key``: the caller's pair, of the admin or client role (default: security.admin_key)."""
    cfg = config.drafter(name)
    if not config.security.curve or is_local(endpoint or cfg.client):
        return None
    return CurveKeys(*_load(config, key or config.security.admin_key), _public(config, cfg.key or name))


# --- allow-lists ---------------------------------------------------------------------------

@dataclass
class KnownKey:
    name: str
    roles: set[str]


def _read_public(path: Path) -> bytes | None:
    try:
        return zmq.auth.load_certificate(path)[0]
    except (OSError, ValueError):
        return None


def legacy_keys(config: Config) -> list[Path]:
    """Public keys filed directly in authorized/ (no role): the layout before roles."""
    folder = authorized_dir(config)
    return sorted(folder.glob("*.key")) if folder.is_dir() else []


class RoleAllowList:
    """The ZAP decision for every CURVE socket of one process, with refusals logged and counted."""

    def __init__(self, config: Config):
        folder = authorized_dir(config)
        legacy = legacy_keys(config)
        if legacy:
            names = ", ".join(p.stem for p in legacy)
            raise InsecureConfig(
                f"{folder} holds keys without a role ({names}); a key now belongs to one role. File each one with "
                f"`sled keys authorize NAME --role drafter|verifier|admin|client` (docs/reliability.md, Keys)")
        if not folder.is_dir():
            raise FileNotFoundError(f"no allow-list folder {folder}: `sled keys generate NAME --authorize --role ROLE`")
        self.keys: dict[bytes, KnownKey] = {}
        for role in ROLES:
            for path in sorted((folder / role).glob("*.key")):
                public = _read_public(path)
                if public is not None:
                    self.keys.setdefault(public, KnownKey(path.stem, set())).roles.add(role)
        self.names: dict[bytes, str] = {}  # keys made here but on no list, for naming refusals
        for path in keys_dir(config).glob("*.key"):
            public = _read_public(path)
            if public is not None:
                self.names[public] = path.stem
        self.refused: dict[str, int] = {UNAUTHORISED: 0, WRONG_ROLE: 0}
        self._logged: dict[tuple[str, bytes], float] = {}

    def allows(self, domain: str, key: bytes) -> bool:
        known = self.keys.get(key)
        if known is not None and known.roles & set(DOMAIN_ROLES.get(domain, ())):
            return True
        reason = WRONG_ROLE if known is not None else UNAUTHORISED
        self.refuse(domain, reason, key, known.name if known else self.names.get(key),
                    sorted(known.roles) if known else [])
        return False

    def refuse(self, domain: str, reason: str, key: bytes | None, name: str | None = None,
               roles: list[str] | None = None) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        now = time.monotonic()
        marker = (domain, key or b"")
        if now - self._logged.get(marker, -REFUSAL_LOG_INTERVAL_S) < REFUSAL_LOG_INTERVAL_S:
            return
        self._logged[marker] = now
        log.warning("peer_refused", socket=domain, reason=reason, key=name,
                    fingerprint=fingerprint(key) if key else None, key_roles=roles,
                    admits=list(DOMAIN_ROLES.get(domain, ())), refused=self.refused[reason])

    def callback(self, domain: str, key: bytes) -> bool:  # pyzmq's credentials-provider interface
        return self.allows(domain, key)


def start_authenticator(ctx: zmq.asyncio.Context, config: Config,
                        domains: tuple[str, ...] = (FRONTEND, BACKEND)) -> tuple[AsyncioAuthenticator, RoleAllowList]:
    """ZAP for this process's CURVE sockets, each domain admitting its roles (DOMAIN_ROLES)."""
    allow = RoleAllowList(config)
    auth = AsyncioAuthenticator(ctx)
    auth.start()
    for domain in domains:
        auth.configure_curve_callback(domain=domain, credentials_provider=allow)
    return auth, allow


class HandshakeWatch:
    """Counts CURVE handshakes that fail before ZAP is asked (a peer without CURVE, or one that
    does not know the server's key) as ``unauthorised``, through the socket's monitor."""

    FAILED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL

    def __init__(self, sock: zmq.asyncio.Socket, domain: str, allow: RoleAllowList):
        self.monitor = sock.get_monitor_socket(self.FAILED)
        self.sock = sock
        self.domain = domain
        self.allow = allow

    async def run(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())
            if event["event"] & self.FAILED:
                self.allow.refuse(self.domain, UNAUTHORISED, None, name="(no valid CURVE handshake)")

    def close(self) -> None:
        import contextlib

        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(0)


# --- key management (sled keys) ------------------------------------------------------------

def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")


def authorize(config: Config, name: str, role: str) -> Path:
    """File NAME's public key in ROLE's allow-list (moving it out of the role-less authorized/)."""
    _check_role(role)
    source = keys_dir(config) / f"{name}.key"
    legacy = authorized_dir(config) / f"{name}.key"
    if not source.is_file():
        source = legacy
    if not source.is_file():
        raise FileNotFoundError(f"no public key {name}.key in {keys_dir(config)} or {authorized_dir(config)}")
    folder = authorized_dir(config) / role
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, folder / f"{name}.key")
    if legacy.is_file():
        legacy.unlink()
    return folder / f"{name}.key"


def generate(config: Config, names: list[str], role: str | None = None, *, keep: bool = False) -> list[Path]:
    """Make NAME.key / NAME.key_secret for each name; with ``role``, authorise each for it.
    ``keep``: leave a pair that already exists as it is (re-running a provisioning script)."""
    if role is not None:
        _check_role(role)
    folder = keys_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for name in names:
        public = folder / f"{name}.key"
        if not (keep and public.is_file() and public.with_suffix(".key_secret").is_file()):
            public = Path(zmq.auth.create_certificates(folder, name)[0])
        made.append(public)
        if role is not None:
            authorize(config, name, role)
    return made


def listing(config: Config) -> list[dict]:
    folder = authorized_dir(config)
    roles: dict[str, set[str]] = {}
    for role in ROLES:
        for path in (folder / role).glob("*.key") if folder.is_dir() else ():
            roles.setdefault(path.stem, set()).add(role)
    legacy = {p.stem for p in legacy_keys(config)}
    rows = []
    for path in sorted(keys_dir(config).glob("*.key")):
        public, _ = zmq.auth.load_certificate(path)
        rows.append({
            "name": path.stem,
            "public_key": public.decode(),
            "fingerprint": fingerprint(public),
            "has_secret": path.with_suffix(".key_secret").is_file(),
            "roles": sorted(roles.get(path.stem, ())),
            "authorized": bool(roles.get(path.stem)),
            "unfiled": path.stem in legacy,  # in authorized/ without a role: not honoured
        })
    return rows


def bundle(config: Config, kind: str, name: str, out: Path, *, with_admin: bool = False) -> list[Path]:
    """Copy into ``out`` the key files one host needs (and nothing more):

    broker            its pair and the allow-lists (authorized/ROLE/*.key)
    verifier NAME     its pair and the broker's public key
    drafter NAME      its pair, the broker's public key, and the admin and client allow-lists
                      (its client socket admits those keys when it is bound off loopback)
    admin|client NAME its pair, the broker's public key and every drafter's public key
                      (to reach drafters' client sockets)

    ``with_admin`` adds the admin pair (security.admin_key) for a host's health checks.
    """
    src, allowed = keys_dir(config), authorized_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    files: list[tuple[Path, Path]] = []

    def pair(n: str) -> None:
        files.extend([(src / f"{n}.key", out / f"{n}.key"), (src / f"{n}.key_secret", out / f"{n}.key_secret")])

    def allow_lists(roles) -> None:
        for role in roles:
            files.extend((p, out / "authorized" / role / p.name) for p in sorted((allowed / role).glob("*.key")))

    server = config.security.server_key
    if kind == "broker":
        pair(name or server)
        allow_lists(ROLES)
    elif kind in ("verifier", "drafter", "admin", "client"):
        pair(name)
        files.append((src / f"{server}.key", out / f"{server}.key"))
        if kind == "drafter":
            allow_lists(("admin", "client"))
        if kind in ("admin", "client"):
            files.extend((p, out / p.name) for p in sorted((allowed / "drafter").glob("*.key")))
    else:
        raise ValueError(f"unknown kind {kind!r} (broker, verifier, drafter, admin, client)")
    if with_admin and kind != "admin":
        pair(config.security.admin_key)
        if kind != "drafter":
            files.append((src / f"{server}.key", out / f"{server}.key"))
    written = []
    for source, target in files:
        if not source.is_file():
            raise FileNotFoundError(f"no {source}: generate and authorise the keys first (`sled keys generate`)")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        written.append(target)
    return sorted(set(written))


def with_domain(keys: CurveKeys | None, domain: str) -> CurveKeys | None:
    return dataclasses.replace(keys, domain=domain) if keys else None
