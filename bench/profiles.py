"""Device classes of the emulated fleet, the two target/drafter setups, and the power figures the
energy estimate uses. Sources and reasoning are in docs/benchmarks.md ("Device profiles").

``slowdown`` is how many times longer the device takes to draft than one core of this machine
running the same drafter (torch, fp32, one thread). The numbers are estimates from public
figures, not measurements of the devices; change them with ``sled bench --profile pi5.slowdown=3``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from workers.datastore import BUILTIN
from workers.lookup import DEFAULT_MIN_MATCH as LOOKUP
from workers.token_tree import DEFAULT_TREE_DEPTH, DEFAULT_TREE_NODES


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    kind: str  # "model", "feature" or "ngram"
    slowdown: float  # device draft time / this machine's one-core draft time
    rtt_ms: float  # round trip added to the device's link (user-space delay proxy)
    rate_mbit: float  # the link's bandwidth cap (tbf), both ways
    power_w: float  # device power while drafting (for the energy estimate)
    link: str = ""  # what the link stands for


# Raspberry Pi 5: 4x Cortex-A76 at 2.4 GHz, LPDDR4X; home Wi-Fi to an edge server
PI5 = DeviceProfile("pi5", "model", slowdown=2.5, rtt_ms=20.0, rate_mbit=50.0, power_w=7.0, link="Wi-Fi, 20 ms RTT, 50 Mbit/s")

PROFILES: dict[str, DeviceProfile] = {
    "pi5": PI5,
    # Jetson Orin Nano 8 GB: drafts on its 1024-core Ampere GPU; wired Ethernet to the edge server
    "orin": DeviceProfile("orin", "model", slowdown=1.0, rtt_ms=5.0, rate_mbit=100.0, power_w=15.0, link="Ethernet, 5 ms RTT, 100 Mbit/s"),
    # a Pi 5 running the feature-conditioned head (workers/feature_head.py) instead of a ladder rung:
    # the same device and link as pi5; its verdicts carry the target's features back over that link
    "feature": dataclasses.replace(PI5, name="feature", kind="feature"),
    # model-free class (a phone or microcontroller running n-gram lookup); cellular link
    "ngram": DeviceProfile("ngram", "ngram", slowdown=4.0, rtt_ms=20.0, rate_mbit=20.0, power_w=3.0, link="LTE, 20 ms RTT, 20 Mbit/s"),
    # a Pi 5 carrying a model of another family than the target's (its own tokenizer: its drafts are
    # re-encoded as target ids, workers/translating_drafter.py)
    "pi5-smollm2": dataclasses.replace(PI5, name="pi5-smollm2"),
}

# The server the energy estimate assumes: a 32-core edge-server CPU with a 250 W TDP, so about
# 7.8 W per fully busy core. An estimate for a CPU server; a GPU server is reported separately.
SERVER_WATTS_PER_CORE = 250.0 / 32


@dataclass(frozen=True)
class DrafterChoice:
    model: str  # "ladder:RUNG", a folder, "feature" (the committed feature head) or "ngram"
    gamma: int
    min_confidence: float = 0.0
    lookup_min_match: int = 0  # context lookup in front of the drafter (workers/lookup.py); 0 = off
    tree_nodes: int = 0  # the feature head drafts token trees of at most this many tokens (workers/token_tree.py)
    # the target's earlier continuations (workers/datastore.py): "ngram" drafts from them behind
    # context lookup; a model or the feature head has them draft where it is unsure and branch its
    # trees (workers/lookup.py)
    datastore: str = ""
    tree_depth: int = 0  # the trees' levels (0: gamma)


@dataclass(frozen=True)
class Setup:
    """One target with the drafter each device class runs, and the server-side drafter."""

    name: str
    target: str
    drafters: dict[str, DrafterChoice]  # device class -> its drafter
    server_drafter: DrafterChoice  # server-side speculative decoding and assisted generation
    prompts: str  # "chat" (pipeline/sample_prompts.py) or "code" (bench/qwen.py)
    # capacity objective: median time per output token. Default setup: 200 ms (5 tokens/s, reading
    # speed). Qwen: 1000 ms -- the 1.5B target alone needs ~430 ms per token on one core here.
    slo_tpot_ms: float = 200.0
    fleet: list[str] = field(default_factory=lambda: ["pi5", "orin", "ngram"])
    sled_overrides: tuple[str, ...] = ()  # settings of the SLED processes this setup needs


DEFAULT = Setup(
    name="default",
    target="smollm2",
    # as config.toml's fleet: the model classes with context lookup in front (workers/lookup.py),
    # the feature class with the datastore behind too
    drafters={"pi5": DrafterChoice("ladder:pi5", 4, 0.5, LOOKUP), "orin": DrafterChoice("ladder:orin", 4, 0.5, LOOKUP),
              "feature": DrafterChoice("feature", 4, 0.0, LOOKUP, DEFAULT_TREE_NODES, datastore=BUILTIN,
                                       tree_depth=DEFAULT_TREE_DEPTH),
              "ngram": DrafterChoice("ngram", 4, 0.0, LOOKUP, datastore=BUILTIN)},
    server_drafter=DrafterChoice("ladder:orin", 4, 0.5),
    prompts="chat",
    fleet=["pi5", "orin", "feature", "ngram"],  # the classes of `sled demo`'s default fleet
)


def qwen_setup(paths: dict[str, str]) -> Setup:
    """The Qwen2.5-Coder 1.5B target with the 0.5B drafter on two device classes (bench/qwen.py): the
    regime SLED exists for, so the fleet is model classes only (an n-gram device would be the
    slowest session of every level and measure the n-gram drafter instead of the pair), and a
    third class drafting with SmolLM2-135M through its own tokenizer."""
    drafter = DrafterChoice(paths["drafter"], 4)
    # pi5-smollm2: the default target's SmolLM2-135M, another tokenizer, drafting for the Qwen target
    return Setup(name="qwen", target=paths["target"],
                 drafters={"pi5": drafter, "orin": drafter, "pi5-smollm2": DrafterChoice("smollm2", 4)},
                 server_drafter=drafter, prompts="code", slo_tpot_ms=1000.0, fleet=["pi5", "orin", "pi5-smollm2"],
                 # 32 sessions opening at once: their prefills of the 1.5B target on one CPU thread
                 # take over a minute in one batch, past the default 30 s verdict timeout
                 sled_overrides=("limits.verdict_timeout_s=300.0",))


def with_overrides(profiles: dict[str, DeviceProfile], items: list[str]) -> dict[str, DeviceProfile]:
    """Apply ``CLASS.FIELD=VALUE`` overrides (``--profile pi5.slowdown=3``)."""
    out = dict(profiles)
    for item in items:
        key, _, value = item.partition("=")
        name, _, attr = key.partition(".")
        if name not in out or attr not in {f.name for f in dataclasses.fields(DeviceProfile)} or attr in ("name", "kind"):
            raise ValueError(f"--profile {item!r}: expected CLASS.FIELD=VALUE with CLASS in {sorted(out)}")
        out[name] = dataclasses.replace(out[name], **{attr: type(getattr(out[name], attr))(value)})
    return out
