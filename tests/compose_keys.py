"""The compose stack's one-shot `keys` service, run here: its script with each named volume as a
folder under ``root`` (volume NAME -> root/NAME), so tests use exactly the keys it makes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
MASTER = "/var/lib/sled/keys"  # the keys service's own volume (every pair, the allow-lists)
BUNDLES = "/run/sled-keys/"  # where it mounts volume keys-SERVICE: BUNDLES + SERVICE


def provision(root: Path) -> dict[str, Path]:
    """Run the keys service; return {service: its keys folder} for every service that mounts one."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    keys = compose["services"]["keys"]
    script = keys["command"][0].replace("$$", "$")  # compose's escape for a literal $
    script = script.replace(MASTER, str(root / "sled-keys")).replace(BUNDLES, f"{root}/keys-")
    script = script.replace("python ", f"{sys.executable} ")
    # chown hands the volumes to the images' user; here the files stay the caller's
    script = "\n".join(line for line in script.splitlines() if not line.startswith("chown "))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLED_")}
    env.update({k: str(v) for k, v in keys["environment"].items()})
    env["SLED_SECURITY__KEYS_DIR"] = str(root / "sled-keys")
    env["PYTHONPATH"] = str(ROOT)
    subprocess.run(["sh", "-ec", script], env=env, cwd=ROOT, check=True, capture_output=True)
    out = {}
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source, target = volume.split(":")[:2]
            if target == "/etc/sled/keys":
                out[name] = root / source
    return out
