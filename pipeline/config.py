"""Configuration: typed dataclasses read from ``config.toml``, then overridden by ``--set`` flags.

Environment variables come between the file and the flags: ``SLED_BROKER__MAX_WAIT_MS=10`` is
``broker.max_wait_ms=10`` (``__`` separates the parts, names are case-insensitive), which is how
the compose stack configures its containers.

Overrides are ``section.key=value`` (or ``drafters.NAME.key=value``) with the value parsed as a
TOML value when it parses (``10``, ``true``, ``"x"``, ``[1, 2]``) and taken as a bare string
otherwise, so the same names work in the file, on the command line and in launched children.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config.toml"


@dataclass
class BrokerConfig:
    frontend: str = "tcp://127.0.0.1:5555"  # drafters connect here
    backend: str = "tcp://127.0.0.1:5556"  # verifiers connect here
    max_wait_ms: float = 5.0  # deadline from the first arrival of a batch
    # sessions per verify batch; the token budget below is what bounds a batch in practice. 32
    # split the bench's 48- and 64-session levels into two forwards where AR ran one, 1.3-1.7x
    # AR's forwards on a GPU (docs/benchmarks-history.md, session 29)
    max_batch_sessions: int = 128
    max_batch_tokens: int = 256
    max_queue: int = 256  # proposals queued per verifier before "overloaded"
    max_sessions: int = 256  # sessions per verifier; a new one beyond this is refused "overloaded"
    heartbeat_ms: int = 500
    liveness: int = 6  # a peer silent for heartbeat_ms * liveness is dead
    # SLO-aware batching: when > 0, the broker may hold a free verifier's batch briefly for
    # proposals it expects soon, never pushing a session past this time per output token;
    # 0 dispatches as soon as the verifier is free
    slo_tpot_ms: float = 0.0


@dataclass
class VerifierConfig:
    name: str = "verifier-0"
    target: str = "smollm2"
    device: str = "cpu"
    dtype: str = "float32"
    max_sessions: int = 512  # KV caches kept; least recently used are evicted beyond this
    session_idle_s: float = 300.0  # a cache unused this long is freed (its drafter may be gone)
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    # A target larger than one GPU: "auto" (or "balanced", ...) places its layers over every
    # visible device with accelerate's device_map; "" keeps the whole model on ``device``.
    device_map: str = ""
    max_memory: dict = field(default_factory=dict)  # per-device caps for device_map, e.g. {"0": "20GiB"}
    key: str = ""  # CURVE key pair name when security.curve is on; "" = the verifier's name
    # "static": a paged KV pool allocated once, one forward over the ragged batch, acceptance on the
    # device (workers/static_verifier.py; Llama and Qwen2, others fall back to eager). The default:
    # on a CPU (fp32, one thread) a verify forward takes 0.6-0.9x the eager backend's time
    # (docs/benchmarks-history.md, session 10).
    # "eager": transformers' forward over per-session caches (workers/target.py), any causal LM
    backend: str = "static"
    kv_cache_mb: float = 1024.0  # static backend: the KV pool, allocated once
    compile: str = "auto"  # static backend: torch.compile(mode="reduce-overhead"): "auto" (on CUDA), "on", "off"
    # New sessions' histories are prefilled together, in chunks of at most this many (padded)
    # tokens per forward, inside the batch that holds running sessions' verify rows
    # (workers/prefill.py; 0 = one session at a time, as before)
    prefill_chunk_tokens: int = 512
    # On a CPU: reorder every linear weight once for oneDNN (workers/packed_linear.py). A forward of
    # 5 rows then costs what one row does instead of 1.6x (default target, fp32, one thread)
    prepack: bool = True
    # "" = each batch's cost, as the verifier reports it to the broker, is its measured compute; a
    # cost table (bench/results/gpu_cost_<card>.json) = the table's price for the batch's verify
    # shape instead, so that the broker's prices, and so every adaptive drafter's choices, are those
    # of the table's device (workers/cost_table.py). For benchmarks: `sled bench` runs SLED once more
    # with a GPU table here to project SLED onto a GPU with the drafts a GPU's prices call for
    cost_table: str = ""


@dataclass
class DrafterConfig:
    kind: str = "model"  # "model" (any causal LM sharing the target's tokenizer), "feature" or "ngram"
    model: str = ""
    client: str = "tcp://127.0.0.1:5600"  # where local clients (demo, gateway) send Generate
    # where this device reaches the broker's frontend: "" = broker.frontend. A device behind NAT, a
    # proxy or another name for the server connects to an address other than the one the broker binds
    broker: str = ""
    gamma: int = 4  # most draft tokens per round (the cap when ``adaptive``)
    adaptive: bool = True  # draft length follows measured acceptance and the verdict's row_cost_ms
    # kinds "model" and "feature" on a CPU: weights reordered once for oneDNN (workers/packed_linear.py);
    # a token tree's levels and the rows fed after a verdict cost much less (a pi5 tree round 154 -> 101 ms, under load)
    prepack: bool = True
    proactive: bool = False  # keep drafting past an outstanding proposal, assuming it is accepted
    # adaptive: when the policy drafts nothing, the server decodes this many more rounds of the
    # session on its own (Propose.plain_after) before the device proposes again; 0 = every round
    # crosses the link
    burst: int = 8
    min_confidence: float = 0.0  # stop a draft early when the drafter's top probability drops below
    top_k: int = 8  # sampling mode: size of the truncated draft distribution sent with each token
    ngram_max: int = 4  # longest context suffix looked up (kind "ngram", and lookup_min_match)
    # kinds "model" and "feature": where the context ends in an n-gram of at least this many tokens
    # that occurred before, draft what followed it instead of the model's tokens (workers/lookup.py);
    # 0 = off. Kind "ngram": the shortest repeat its context lookup drafts from (0 = 1)
    lookup_min_match: int = 0
    # a datastore of the target's earlier continuations (workers/datastore.py): "builtin" = the
    # committed one (drafters/ngram, built for the default target), a folder, or "" = none. Kind
    # "ngram" drafts from it where the context has not repeated; kinds "model" and "feature" draft
    # its continuation where the model is unsure, and add it to each token tree as one more branch
    # (workers/lookup.py)
    datastore: str = ""
    # kinds "feature" and "model" (not one translating another tokenizer), greedy requests: draft a
    # token tree of at most this many tokens instead of a chain (workers/token_tree.py; each token
    # is a verify row); 0 = chains. Its levels (0 = gamma), and how many of the likeliest paths each
    # level expands, each with as many children (0 = workers/token_tree.py DEFAULT_TREE_BRANCH)
    tree_nodes: int = 0
    tree_depth: int = 0
    tree_branch: int = 0
    max_sessions: int = 64
    dtype: str = "float32"
    threads: int = 1  # torch threads for drafting (an edge device has few cores)
    # Benchmarks (bench/): emulate a slower device -- hold each draft until this many times its
    # measured compute time has passed (0 = off) -- and replay a recorded draft trace instead
    # of computing drafts ("" = off; see bench/traces.py).
    emulate_slowdown: float = 0.0
    replay: str = ""
    key: str = ""  # CURVE key pair name when security.curve is on; "" = the drafter's name
    # kind = "model" with another tokenizer than the target's: draft in its own tokens and send them
    # re-encoded as target ids (workers/translating_drafter.py). None = when the vocabularies differ
    translate: bool | None = None


@dataclass
class LimitsConfig:
    max_message_bytes: int = 1 << 20
    max_draft_tokens: int = 32
    max_history_tokens: int = 4096
    max_new_tokens: int = 2048
    verdict_timeout_s: float = 30.0  # a drafter resends with its history after this long
    request_timeout_s: float = 600.0


@dataclass
class LogConfig:
    format: str = "console"  # "console" or "json"
    level: str = "info"


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    default_model: str = ""  # drafter used when a request names none; "" = the first of demo.drafters
    api_keys: list[str] = field(default_factory=list)  # when set, "Authorization: Bearer KEY" is required
    api_keys_file: str = ""  # more API keys, one a line (the compose keys service writes one)
    max_prompt_tokens: int = 2048
    stats_interval_s: float = 1.0  # how often broker and drafter figures are collected


@dataclass
class SecurityConfig:
    curve: bool = False  # CurveZMQ on the broker's frontend and backend (and off-loopback drafter client sockets)
    # Without CURVE no ZeroMQ socket is bound off loopback and the gateway needs api_keys off
    # loopback; true overrides both checks (warned about at every start).
    allow_insecure: bool = False
    keys_dir: str = "keys"  # NAME.key / NAME.key_secret pairs (`sled keys generate NAME`)
    authorized_dir: str = ""  # allow-lists, one folder per role (drafter/, verifier/, admin/, client/); "" = keys_dir/authorized
    server_key: str = "broker"  # the broker's key pair
    admin_key: str = "admin"  # operator tools (launcher, status, gateway) reading figures


@dataclass
class DemoConfig:
    sessions: int = 8
    max_new_tokens: int = 48
    drafters: list[str] = field(default_factory=lambda: ["pi5", "orin", "feature", "ngram"])


@dataclass
class Config:
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    drafters: dict[str, DrafterConfig] = field(default_factory=dict)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def drafter(self, name: str) -> DrafterConfig:
        if name not in self.drafters:
            raise KeyError(f"no drafter {name!r} in the configuration (have: {', '.join(self.drafters)})")
        return self.drafters[name]


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply(obj: Any, data: dict, where: str) -> None:
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        if key not in names:
            raise ValueError(f"unknown setting {where}{key}")
        current = getattr(obj, key)
        if current is None:  # an optional setting ("bool | None"): its declared type decides
            current = {"bool | None": False}.get(str(names[key].type), value)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{where}{key}.")
        elif isinstance(obj, Config) and key == "drafters":  # drafters.NAME tables
            for name, table in value.items():
                _apply(current.setdefault(name, DrafterConfig()), table, f"{where}{key}.{name}.")
        else:
            expected = type(current)
            if expected is float and isinstance(value, int):
                value = float(value)
            if not isinstance(value, expected):
                raise ValueError(f"{where}{key} must be {expected.__name__}, got {value!r}")
            setattr(obj, key, value)


def _nest(dotted: str, value: Any) -> dict:
    keys = dotted.split(".")
    out: dict = {}
    node = out
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return out


ENV_PREFIX = "SLED_"


def env_overrides(environ: dict[str, str]) -> list[str]:
    """``SLED_SECTION__KEY=value`` variables as ``section.key=value`` overrides."""
    out = []
    for name, value in sorted(environ.items()):
        if name.startswith(ENV_PREFIX) and "__" in name:
            key = ".".join(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
            out.append(f"{key}={value}")
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                environ: dict[str, str] | None = None) -> Config:
    """File, then SLED_* environment variables, then overrides (each later one wins)."""
    import os

    config = Config()
    path = Path(path) if path else DEFAULT_CONFIG
    if path.is_file():
        with path.open("rb") as fh:
            _apply(config, tomllib.load(fh), "")
    elif path != DEFAULT_CONFIG:
        raise FileNotFoundError(f"no configuration file at {path}")
    for item in [*env_overrides(os.environ if environ is None else environ), *overrides]:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        _apply(config, _nest(key.strip(), _parse_value(text.strip())), "")
    return config
