"""CurveZMQ on the sockets that cross a machine boundary (the broker's frontend and backend).

Keys are pyzmq certificate files made by ``sled keys generate NAME``: ``NAME.key`` (public)
and ``NAME.key_secret`` in ``security.keys_dir``. The broker serves with its own pair and lets
in only the public keys found in ``security.authorized_dir`` (an allow-list, re-read at start);
every peer authenticates with its own pair. With CURVE on, a session belongs to the public key
that opened it, not to a socket identity a peer could choose.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from pipeline.config import Config


@dataclass(frozen=True)
class CurveKeys:
    public: bytes
    secret: bytes
    server_public: bytes | None = None  # set on clients: the broker's public key

    def apply(self, sock: zmq.Socket, *, server: bool) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        if server:
            sock.curve_server = True
        else:
            sock.curve_serverkey = self.server_public


def keys_dir(config: Config) -> Path:
    return Path(config.security.keys_dir)


def authorized_dir(config: Config) -> Path:
    return Path(config.security.authorized_dir) if config.security.authorized_dir else keys_dir(config) / "authorized"


def _load(config: Config, name: str) -> tuple[bytes, bytes]:
    path = keys_dir(config) / f"{name}.key_secret"
    if not path.is_file():
        raise FileNotFoundError(f"no key pair {path}: run `sled keys generate {name}`")
    public, secret = zmq.auth.load_certificate(path)
    return public, secret


def server_keys(config: Config) -> CurveKeys | None:
    if not config.security.curve:
        return None
    return CurveKeys(*_load(config, config.security.server_key))


def client_keys(config: Config, name: str) -> CurveKeys | None:
    """A peer's keys for connecting to the broker, or None when CURVE is off."""
    if not config.security.curve:
        return None
    server_public, _ = zmq.auth.load_certificate(keys_dir(config) / f"{config.security.server_key}.key")
    return CurveKeys(*_load(config, name), server_public)


def start_authenticator(ctx: zmq.asyncio.Context, config: Config) -> AsyncioAuthenticator:
    allowed = authorized_dir(config)
    if not allowed.is_dir():
        raise FileNotFoundError(f"no allow-list folder {allowed}: `sled keys generate NAME --authorize`")
    auth = AsyncioAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(allowed))
    return auth


def generate(config: Config, names: list[str], authorize: bool) -> list[Path]:
    folder = keys_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for name in names:
        public, _secret = zmq.auth.create_certificates(folder, name)
        made.append(Path(public))
        if authorize:
            authorized_dir(config).mkdir(parents=True, exist_ok=True)
            shutil.copy(public, authorized_dir(config) / Path(public).name)
    return made


def listing(config: Config) -> list[dict]:
    allowed = {p.name for p in authorized_dir(config).glob("*.key")} if authorized_dir(config).is_dir() else set()
    rows = []
    for path in sorted(keys_dir(config).glob("*.key")):
        public, _ = zmq.auth.load_certificate(path)
        rows.append({
            "name": path.stem,
            "public_key": public.decode(),
            "has_secret": path.with_suffix(".key_secret").is_file(),
            "authorized": path.name in allowed,
        })
    return rows
