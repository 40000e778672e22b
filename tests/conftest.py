"""Shared fixtures: free loopback ports, tiny seeded models saved as real model folders, and a
helper that starts a real multi-process stack on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from bench.fleet import free_ports  # noqa: F401 - tests import it from here
from pipeline.config import load_config
from pipeline.stack import Stack

TINY_VOCAB = 256


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest single-threaded; restore the setting for other tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(seed: int, layers: int = 2, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=None,
        bos_token_id=None, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=TINY_VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=1024,
                        eos_token_id=None, bos_token_id=None)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Seeded random-weight models saved as ordinary model folders, so the real loading code runs:
    the target, a copy of it (accepts every draft), a smaller Llama and a GPT-2 (other architecture)."""
    root = tmp_path_factory.mktemp("models")
    models = {
        "target": tiny_llama(1, layers=2),
        "copy": tiny_llama(1, layers=2),
        "small": tiny_llama(2, layers=1, hidden=32),
        "gpt2": tiny_gpt2(3),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = root / name
        model.save_pretrained(paths[name])
    return paths


def stack_overrides(target: str, drafters: dict[str, dict], **extra) -> list[str]:
    """--set overrides for a stack on fresh loopback ports."""
    ports = free_ports(2 + len(drafters))
    out = [
        f'broker.frontend="tcp://127.0.0.1:{ports[0]}"',
        f'broker.backend="tcp://127.0.0.1:{ports[1]}"',
        f"verifier.target={json.dumps(str(target))}",
        "verifier.threads=1",
        "broker.heartbeat_ms=200",
    ]
    for port, (name, settings) in zip(ports[2:], drafters.items()):
        out.append(f'drafters.{name}.client="tcp://127.0.0.1:{port}"')
        for key, value in settings.items():
            out.append(f"drafters.{name}.{key}={json.dumps(value)}")
    for key, value in extra.items():
        out.append(f"{key.replace('__', '.')}={json.dumps(value)}")
    return out


def make_stack(tmp_path: Path, target: str, drafters: dict[str, dict], verifiers: int = 1, **extra) -> Stack:
    overrides = stack_overrides(target, drafters, **extra)
    config = load_config(None, overrides)
    return Stack(config, None, overrides, list(drafters), verifiers=verifiers, log_dir=tmp_path / "logs")
