"""The compose stack (docker/compose.yaml) and its images: valid for docker-compose, and in
agreement with config.toml — services, published ports, endpoints, health checks, the model
cache volume, the keys mounts, and every setting given as a SLED_* variable that config.toml
knows. Secure as shipped: CURVE on in every service, and the keys service's script (run here)
gives each service the keys its role needs and no other secret. (There is no Docker engine
here: images are not built, the stack is not started.)"""

import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from pipeline.config import DEFAULT_CONFIG, load_config
from pipeline.security import (
    RoleAllowList,
    client_keys,
    drafter_client_curve,
    drafter_keys_for_client,
    server_keys,
)
from tests.compose_keys import provision
from tests.netns import ensure_debian_tool

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
HEALTHCHECK = "/opt/sled/docker/healthcheck.py"
KEYS_MOUNT = "/etc/sled/keys"

BASE = load_config(DEFAULT_CONFIG, environ={})  # config.toml alone
COMPOSE = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES = COMPOSE["services"]
DRAFTER_SERVICES = {f"drafter-{name}": name for name in BASE.demo.drafters}
ROLE_SERVICES = {name: svc for name, svc in SERVICES.items() if name != "keys"}  # keys: one-shot, before them


def effective(service: str, **extra: str):
    """The configuration a service's container runs with: config.toml, then its environment."""
    env = {k: str(v) for k, v in SERVICES[service].get("environment", {}).items()}
    return load_config(DEFAULT_CONFIG, environ={**env, **extra})


def split(endpoint: str) -> tuple[str, int]:
    parts = urlsplit(endpoint)
    assert parts.scheme == "tcp", endpoint
    return parts.hostname, parts.port


def port_of(endpoint: str) -> int:
    return split(endpoint)[1]


def test_docker_compose_accepts_the_file():
    binary = ensure_debian_tool("docker-compose", "docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed and cannot be (make test installs the Debian package)")
    done = subprocess.run([binary, "-f", str(COMPOSE_FILE), "config"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rendered = yaml.safe_load(done.stdout)
    assert set(rendered["services"]) == set(SERVICES)
    for name, svc in rendered["services"].items():  # CURVE on everywhere, the keys service included
        assert svc["environment"]["SLED_SECURITY__CURVE"] == "true", name
    devices = rendered["services"]["verifier"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_services_are_the_roles_of_the_stack():
    assert set(SERVICES) == {"keys", "broker", "verifier", "gateway", *DRAFTER_SERVICES}
    assert SERVICES["broker"]["command"] == ["broker"]
    assert SERVICES["gateway"]["command"] == ["gateway"]
    assert SERVICES["verifier"]["command"][:3] == ["launch", "--gpus", "all"]  # one process per GPU
    kinds = set()
    for svc, name in DRAFTER_SERVICES.items():
        assert SERVICES[svc]["command"] == ["drafter", name]
        kinds.add(BASE.drafter(name).kind)
    assert kinds == {"model", "feature", "ngram"}  # every kind of device class


def test_every_setting_is_a_sled_variable_that_config_toml_knows():
    for name, svc in SERVICES.items():
        env = svc.get("environment", {})
        assert isinstance(env, dict) and env, name
        assert all(key.startswith("SLED_") for key in env), name
        effective(name)  # an unknown setting or a wrong type raises


def test_endpoints_and_ports_agree_with_config_toml():
    broker = effective("broker").broker
    assert split(broker.frontend) == ("0.0.0.0", port_of(BASE.broker.frontend))
    assert split(broker.backend) == ("0.0.0.0", port_of(BASE.broker.backend))
    assert f"{port_of(BASE.broker.frontend)}:{port_of(BASE.broker.frontend)}" in SERVICES["broker"]["ports"]
    for name in ("verifier", "gateway", *DRAFTER_SERVICES):
        config = effective(name)
        assert split(config.broker.frontend) == ("broker", port_of(BASE.broker.frontend)), name
        assert split(config.broker.backend) == ("broker", port_of(BASE.broker.backend)), name
    gateway = effective("gateway")
    for svc, name in DRAFTER_SERVICES.items():
        port = port_of(BASE.drafter(name).client)
        assert split(effective(svc).drafter(name).client) == ("0.0.0.0", port)  # the drafter binds
        assert str(port) in SERVICES[svc]["expose"]
        assert split(gateway.drafter(name).client) == (svc, port)  # the gateway connects by name
    assert gateway.gateway.host == "0.0.0.0"
    assert gateway.gateway.port == BASE.gateway.port
    assert f"{BASE.gateway.port}:{BASE.gateway.port}" in SERVICES["gateway"]["ports"]
    assert effective("verifier").verifier.device == "cuda"


def test_gpus_are_reserved_for_the_verifier_only():
    devices = SERVICES["verifier"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    for name, svc in SERVICES.items():
        if name != "verifier":
            assert "reservations" not in svc.get("deploy", {}).get("resources", {}), name


def test_every_service_has_a_health_check_for_its_role():
    expected = {
        "broker": ["broker"],
        "verifier": ["verifier", "verifier-gpu"],  # the names `launch --prefix verifier` gives
        "gateway": ["gateway"],
        **{svc: ["drafter", name] for svc, name in DRAFTER_SERVICES.items()},
    }
    for name, svc in ROLE_SERVICES.items():
        check = svc["healthcheck"]
        assert check["test"] == ["CMD", "python", HEALTHCHECK, *expected[name]], name
        assert {"interval", "timeout", "retries", "start_period"} <= set(check), name
    prefix = SERVICES["verifier"]["command"][SERVICES["verifier"]["command"].index("--prefix") + 1]
    assert expected["verifier"][1] == f"{prefix}-gpu"
    # a role starts once what it connects to is healthy
    assert SERVICES["verifier"]["depends_on"]["broker"]["condition"] == "service_healthy"
    for svc in DRAFTER_SERVICES:
        assert SERVICES["gateway"]["depends_on"][svc]["condition"] == "service_healthy"


def test_health_checks_probe_their_own_container():
    import importlib.util

    spec = importlib.util.spec_from_file_location("healthcheck", DOCKER / "healthcheck.py")
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    assert healthcheck.probe_endpoint("tcp://0.0.0.0:5555") == "tcp://127.0.0.1:5555"
    assert healthcheck.probe_endpoint("tcp://*:5601") == "tcp://127.0.0.1:5601"
    assert healthcheck.probe_endpoint("tcp://broker:5555") == "tcp://broker:5555"
    assert healthcheck.probe_host("0.0.0.0") == "127.0.0.1"
    assert healthcheck.main([]) == 2


def test_model_cache_is_one_named_volume_at_sled_cache():
    assert "sled-cache" in COMPOSE["volumes"]
    for name in ("verifier", "gateway", "drafter-pi5"):  # every service that loads a model or tokenizer
        path = SERVICES[name]["environment"]["SLED_CACHE"]
        assert f"sled-cache:{path}" in SERVICES[name]["volumes"], name
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.cuda"):
        assert f"SLED_CACHE={SERVICES['verifier']['environment']['SLED_CACHE']}" in (DOCKER / dockerfile).read_text()


def test_each_service_mounts_its_own_keys_volume_read_only_after_the_keys_service():
    keys_volumes = {v.split(":")[0] for v in SERVICES["keys"]["volumes"]}
    for name, svc in ROLE_SERVICES.items():
        mounts = [v for v in svc["volumes"] if v.split(":")[1] == KEYS_MOUNT]
        assert mounts == [f"keys-{name}:{KEYS_MOUNT}:ro"], name
        assert f"keys-{name}" in COMPOSE["volumes"] and f"keys-{name}" in keys_volumes, name
        assert svc["depends_on"]["keys"]["condition"] == "service_completed_successfully", name
    assert SERVICES["keys"]["restart"] == "no" and "depends_on" not in SERVICES["keys"]


def test_curve_is_on_in_every_service():
    for name in SERVICES:
        assert effective(name).security.curve is True, name
        assert str(SERVICES[name]["environment"]["SLED_SECURITY__CURVE"]) == "true", name


def test_the_keys_service_gives_each_service_what_its_role_needs_and_no_other_secret(tmp_path):
    folders = provision(tmp_path)
    assert set(folders) == set(ROLE_SERVICES)
    admin = BASE.security.admin_key

    def config(svc):
        return effective(svc, SLED_SECURITY__KEYS_DIR=str(folders[svc]))

    def secrets(svc):
        return sorted(p.name for p in folders[svc].rglob("*.key_secret"))

    broker = config("broker")
    assert server_keys(broker) is not None and client_keys(broker, admin) is not None  # health check
    roles = {k.name: k.roles for k in RoleAllowList(broker).keys.values()}
    assert roles == {"verifier": {"verifier"}, "admin": {"admin"},
                     **{name: {"drafter"} for name in DRAFTER_SERVICES.values()}}
    assert secrets("broker") == ["admin.key_secret", "broker.key_secret"]
    verifier = config("verifier")
    assert client_keys(verifier, verifier.verifier.key) is not None and client_keys(verifier, admin) is not None
    assert secrets("verifier") == ["admin.key_secret", "verifier.key_secret"]
    for svc, name in DRAFTER_SERVICES.items():
        drafter = config(svc)
        assert client_keys(drafter, name) is not None
        assert drafter_client_curve(drafter, name) is not None  # bound on 0.0.0.0: CURVE, admin and client keys
        assert {k.name for k in RoleAllowList(drafter).keys.values()} == {admin}
        assert drafter_keys_for_client(drafter, name) is not None  # its health check
        assert secrets(svc) == sorted(["admin.key_secret", f"{name}.key_secret"])
    gateway = config("gateway")
    assert client_keys(gateway, admin) is not None
    for name in DRAFTER_SERVICES.values():
        assert drafter_keys_for_client(gateway, name) is not None
    assert secrets("gateway") == ["admin.key_secret"]
    api_keys = (folders["gateway"] / "api_keys").read_text().split()
    assert len(api_keys) == 1 and len(api_keys[0]) >= 24
    assert gateway.gateway.api_keys_file == f"{KEYS_MOUNT}/api_keys"
    again = provision(tmp_path)  # a restart keeps the keys
    assert (again["gateway"] / "api_keys").read_text().split() == api_keys


def test_images_pin_the_tested_torch_and_run_the_sled_command():
    pin = re.search(r"^torch==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    cuda = (DOCKER / "Dockerfile.cuda").read_text()
    assert cpu.splitlines()[0].startswith("# syntax=") and "FROM python:3.11-slim" in cpu
    assert f"--index-url https://download.pytorch.org/whl/cpu torch=={pin}" in cpu
    assert re.search(rf"^ARG BASE=pytorch/pytorch:{re.escape(pin)}-cuda[\d.]+-cudnn\d+-runtime$", cuda, re.M)
    for text in (cpu, cuda):
        assert 'ENTRYPOINT ["python", "-m", "pipeline"]' in text
        assert "COPY docker/healthcheck.py ./docker/healthcheck.py" in text
        assert "USER sled" in text
    assert SERVICES["broker"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert SERVICES["verifier"]["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.cuda"):  # the build context sends what is copied
        allowed = (DOCKER / f"{dockerfile}.dockerignore").read_text()
        for source in re.findall(r"^COPY (\S+) ", (DOCKER / dockerfile).read_text(), re.M):
            assert f"!{source.rstrip('/')}" in allowed.replace("/\n", "\n"), (dockerfile, source)
