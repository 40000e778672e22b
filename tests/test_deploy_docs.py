"""docs/configuration.md names every setting of pipeline/config.py with its current default, and
docs/deployment.md's commands, variables and examples are real (parsed by the real CLI and
configuration loader), besides covering what the deployment issue asks for."""

import dataclasses
import json
import re
import shlex
import textwrap
import tomllib
from pathlib import Path

from pipeline import config as config_module
from pipeline.cli import build_parser
from pipeline.config import Config, DrafterConfig, env_overrides, load_config
from training.train_drafters import LADDER_DIR

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


def code_blocks(text: str, language: str) -> list[str]:
    return [block.split("\n", 1)[1] for block in re.findall(r"```" + language + r"\n.*?(?=\s*```)", textwrap.dedent(text), re.S)]


def shell_commands(text: str):
    """(environment assignments, sled argv) of every `sled ...` line of the sh blocks; export
    lines give assignments only."""
    for block in code_blocks(text, "sh"):
        for line in block.splitlines():
            words = shlex.split(line.strip().rstrip("&"), comments=True)
            if words[:1] == ["export"]:
                words = words[1:]
            env = {}
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                name, value = words.pop(0).split("=", 1)
                env[name] = value
            sled = words and words[0].endswith("sled")
            yield env, (words[1:] if sled else None)


def test_deployment_guide_commands_and_settings_are_real():
    """Every `sled` command line in docs/deployment.md parses with the real CLI, every SLED_*
    variable names a real setting with a valid value, and every TOML example loads on top of
    config.toml with the drafters it names resolvable (a renamed rung or setting fails here)."""
    text = (DOCS / "deployment.md").read_text()
    parser = build_parser()
    commands = 0
    for env, argv in shell_commands(text):
        load_config(None, env_overrides(env))  # raises on an unknown setting or a wrong type
        if argv is not None:
            parser.parse_args(argv)  # exits (SystemExit) on an unknown command or flag
            commands += 1
    assert commands >= 10, commands
    tomls = code_blocks(text, "toml")
    assert len(tomls) >= 2
    rungs = json.loads((LADDER_DIR / "ladder.json").read_text())["rungs"]
    for snippet in tomls:
        data = tomllib.loads(snippet)
        overrides = [f"{section}.{key}={json.dumps(value) if not isinstance(value, dict) else toml_value(value)}"
                     for section, table in data.items() if section != "drafters" for key, value in table.items()]
        for name, table in data.get("drafters", {}).items():
            overrides += [f"drafters.{name}.{key}={json.dumps(value)}" for key, value in table.items()]
            if str(table.get("model", "")).startswith("ladder:"):
                assert table["model"].removeprefix("ladder:") in rungs, (table["model"], rungs)
        load_config(None, overrides)


def test_deployment_guide_covers_the_cases():
    text = (DOCS / "deployment.md").read_text()
    for needle in ("docker compose", "sled launch --gpus all", "device_map", "max_memory", "CUDA_VISIBLE_DEVICES",
                   "SLED_BROKER__FRONTEND", "[drafters.", "client", "keys", "## Adding a device"):
        assert needle in text, needle
