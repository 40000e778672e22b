"""`sled` -- one command for every role: broker, verifier, drafter, up, demo (and train/eval)."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import load_config


def _quote(value: str) -> str:
    return json.dumps(value)  # a TOML basic string, so paths and names survive --set parsing


def add_http_flags(parser: argparse.ArgumentParser) -> None:
    """--host/--port of the REST gateway, the same for every command that serves HTTP; main()
    turns them into gateway.host/gateway.port overrides, so the gateway child of `sled up` gets
    them too."""
    parser.add_argument("--host", help="address the gateway listens on (default: gateway.host)")
    parser.add_argument("--port", type=int, help="port the gateway listens on (default: gateway.port)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sled", description="Speculative decoding across machines.")
    parser.add_argument("--config", default=None, help="configuration file (default: config.toml of the project)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set broker.max_wait_ms=10 (repeatable)")
    parser.add_argument("--log-format", choices=["console", "json"], help="log output format")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("broker", help="run the broker")
    p = sub.add_parser("verifier", help="run a verifier worker")
    p.add_argument("--name")
    p.add_argument("--target", help="target model: packaged name, folder, .gguf file or hub name")
    p.add_argument("--device")
    p = sub.add_parser("drafter", help="run a drafter (an edge device)")
    p.add_argument("name", help="a [drafters.NAME] table of the configuration")
    p = sub.add_parser("up", help="run broker, verifier, drafters and the gateway on this machine until interrupted")
    p.add_argument("--drafters", help="comma-separated drafter names (default: demo.drafters)")
    p.add_argument("--no-gateway", action="store_true", help="do not start the REST gateway")
    p.add_argument("--target")
    add_http_flags(p)
    p = sub.add_parser("demo", help="start a local stack, run sessions, print text and figures")
    p.add_argument("--sessions", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--target")
    p.add_argument("--drafters", help="comma-separated drafter names (default: demo.drafters)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of figures")
    p.add_argument("--verify", action="store_true", help="compare every output with the target decoding alone")
    p = sub.add_parser("keys", help="CurveZMQ keys: generate, authorize for a role, list, bundle (security.keys_dir)")
    keys = p.add_subparsers(dest="keys_command", required=True)
    roles = ["drafter", "verifier", "admin", "client"]
    g = keys.add_parser("generate", help="make NAME.key / NAME.key_secret")
    g.add_argument("names", nargs="+")
    g.add_argument("--authorize", action="store_true", help="also file the public key in --role's allow-list")
    g.add_argument("--role", choices=roles, help="the role the key is authorized for (needed with --authorize)")
    g.add_argument("--keep", action="store_true", help="leave pairs that exist already as they are")
    g.set_defaults(handler=_keys)
    a = keys.add_parser("authorize", help="file an existing public key NAME.key in ROLE's allow-list")
    a.add_argument("names", nargs="+")
    a.add_argument("--role", choices=roles, required=True)
    a.set_defaults(handler=_keys)
    ls = keys.add_parser("list", help="list key pairs and the role each is authorized for")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=_keys)
    b = keys.add_parser("bundle", help="copy the key files one host needs into a folder (its security.keys_dir)")
    b.add_argument("kind", choices=["broker", *roles], help="what runs on the host")
    b.add_argument("name", nargs="?", default="", help="its key pair (broker: security.server_key)")
    b.add_argument("out", help="folder to write (then copied to the host)")
    b.add_argument("--with-admin", action="store_true", help="add the admin pair, for the host's health checks")
    b.set_defaults(handler=_keys)
    # commands kept beside what they run: stack status, the REST gateway, training, per-GPU launch, bench
    for module in ("pipeline.status", "gateway.cli", "training.cli", "workers.gpu_launch_cli", "bench.cli"):
        try:
            register = __import__(module, fromlist=["register"]).register
        except ImportError:
            continue
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.log_format:
        overrides.append(f"log.format={_quote(args.log_format)}")
    if args.log_level:
        overrides.append(f"log.level={_quote(args.log_level)}")
    for flag, key in (("target", "verifier.target"), ("name", "verifier.name"), ("device", "verifier.device")):
        if getattr(args, flag, None):
            overrides.append(f"{key}={_quote(getattr(args, flag))}")
    if getattr(args, "host", None):
        overrides.append(f"gateway.host={_quote(args.host)}")
    if getattr(args, "port", None) is not None:
        overrides.append(f"gateway.port={int(args.port)}")
    config = load_config(args.config, overrides)

    if args.command in ("broker", "verifier", "drafter"):
        from pipeline.roles import run_role

        if args.command == "broker":
            from brokers.broker import serve
        elif args.command == "verifier":
            from workers.verifier import serve
        else:
            from functools import partial

            from workers.drafter import serve as serve_drafter

            config.drafter(args.name)
            serve = partial(serve_drafter, name=args.name)
        return run_role(args.command, config, serve)

    drafters = args.drafters.split(",") if getattr(args, "drafters", None) else list(config.demo.drafters)
    for name in drafters:
        config.drafter(name)
    if args.command == "up":
        from functools import partial

        from pipeline.stack import serve_up
        from pipeline.roles import run_role

        return run_role("up", config, partial(serve_up, config_path=args.config, overrides=overrides,
                                              drafters=drafters, gateway=not args.no_gateway))
    if args.command == "demo":
        from pipeline.demo import demo
        from pipeline.logs import configure_logging

        configure_logging(config.log.format, "warning" if args.json else config.log.level)
        return demo(
            config, args.config, overrides,
            sessions=args.sessions or config.demo.sessions,
            max_new_tokens=args.max_new_tokens or config.demo.max_new_tokens,
            drafters=drafters, as_json=args.json, verify=args.verify,
        )
    # commands registered by other packages take the parsed args; the loaded Config rides along.
    # Logs go to stderr, so that a command's --json output stays alone on stdout. Commands that
    # run until stopped configure logging in run_role.
    if args.command not in ("gateway", "launch"):
        from pipeline.logs import configure_logging

        configure_logging(config.log.format, config.log.level)
    args.sled_config = config
    args.sled_overrides = overrides
    return args.handler(args)


def _keys(args) -> int:
    from pipeline import security

    config = args.sled_config
    if args.keys_command == "generate":
        if args.authorize and not args.role:
            print("sled keys generate: --authorize needs --role drafter|verifier|admin|client", file=sys.stderr)
            return 2
        role = args.role if args.authorize else None
        for path in security.generate(config, args.names, role, keep=args.keep):
            print(f"{path}{f'  (authorized: {role})' if role else ''}")
        return 0
    if args.keys_command == "authorize":
        for name in args.names:
            print(security.authorize(config, name, args.role))
        return 0
    if args.keys_command == "bundle":
        from pathlib import Path

        for path in security.bundle(config, args.kind, args.name, Path(args.out), with_admin=args.with_admin):
            print(path)
        return 0
    rows = security.listing(config)
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            role = ",".join(row["roles"]) or ("UNFILED (sled keys authorize)" if row["unfiled"] else "-")
            print(f"{row['name']:20s} {role:10s} {row['fingerprint']}  {row['public_key']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
