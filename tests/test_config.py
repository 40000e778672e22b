"""Configuration: file, SLED_* environment, then --set flags; typos and wrong types are errors."""

import pytest

from pipeline.config import DEFAULT_CONFIG, load_config


def test_project_config_loads_with_its_drafters():
    config = load_config(DEFAULT_CONFIG, environ={})
    assert set(config.demo.drafters) <= set(config.drafters)
    assert config.drafters["ngram"].kind == "ngram"


def test_precedence_file_then_environment_then_flags():
    env = {"SLED_BROKER__MAX_WAIT_MS": "12", "SLED_DRAFTERS__PI5__GAMMA": "7", "SLED_CACHE": "/ignored"}
    config = load_config(None, ["broker.max_wait_ms=20", 'drafters.extra.kind="ngram"'], environ=env)
    assert config.broker.max_wait_ms == 20.0  # the flag wins over the environment
    assert config.drafters["pi5"].gamma == 7
    assert config.drafters["extra"].kind == "ngram"


def test_bare_strings_and_tables():
    config = load_config(None, ["verifier.target=/models/x", 'verifier.max_memory={"0"="2GiB"}'], environ={})
    assert config.verifier.target == "/models/x"
    assert config.verifier.max_memory == {"0": "2GiB"}


@pytest.mark.parametrize("bad", ["broker.max_wait=3", "broker.max_batch_sessions=lots", "nosection.x=1", "broker"])
def test_unknown_or_mistyped_settings_are_refused(bad):
    with pytest.raises(ValueError):
        load_config(None, [bad], environ={})
