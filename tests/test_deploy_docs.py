"""docs/configuration.md names every setting of pipeline/config.py with its current default, and
docs/deployment.md covers what the deployment issue asks for."""

import dataclasses
import json
from pathlib import Path

from pipeline import config as config_module
from pipeline.config import Config, DrafterConfig

DOCS = Path(__file__).resolve().parent.parent / "docs"


def toml_value(value) -> str:
    if value is None:  # an optional setting left out of the file (``drafters.NAME.translate``)
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def settings() -> dict[str, object]:
    """Every setting as `section.key` (`drafters.NAME.key` for the drafter tables) -> its default."""
    out = {}
    for section in dataclasses.fields(Config):
        if section.name == "drafters":
            out.update({f"drafters.NAME.{f.name}": getattr(DrafterConfig(), f.name)
                        for f in dataclasses.fields(DrafterConfig)})
            continue
        instance = section.default_factory()
        out.update({f"{section.name}.{f.name}": getattr(instance, f.name) for f in dataclasses.fields(instance)})
    return out


def test_every_setting_is_documented_with_its_default():
    rows = {}
    for line in (DOCS / "configuration.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 4:
            rows[cells[0].strip("`")] = cells[1].strip("`")
    expected = {name: toml_value(default) for name, default in settings().items()}
    missing = sorted(set(expected) - set(rows))
    assert not missing, f"settings missing from docs/configuration.md: {missing}"
    wrong = {name: (rows[name], value) for name, value in expected.items() if rows[name] != value}
    assert not wrong, f"documented default != dataclass default: {wrong}"
    stale = sorted(set(rows) - set(expected))
    assert not stale, f"docs/configuration.md names settings that no longer exist: {stale}"
    assert config_module.ENV_PREFIX == "SLED_"  # the documented environment prefix


def test_deployment_guide_covers_the_cases():
    text = (DOCS / "deployment.md").read_text()
    for needle in ("docker compose", "sled launch --gpus all", "device_map", "max_memory", "CUDA_VISIBLE_DEVICES",
                   "SLED_BROKER__FRONTEND", "[drafters.", "client", "keys", "## Adding a device"):
        assert needle in text, needle
