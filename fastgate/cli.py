"""Command line: `fastgate serve [--config PATH] [--listen HOST:PORT] [--upstream URL]`, `fastgate --version`.

`main(argv) -> int` is the only place that prints usage errors and picks exit codes.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import __version__
from .config import Config, ConfigError, load_config, with_overrides
from .logs import setup_logging

EXIT_OK = 0
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgate", description="API-key edge in front of Ollama.")
    parser.add_argument("--version", action="version", version=f"fastgate {__version__}")
    parser.epilog = ("Key store commands (need [store] path in the config): fastgate keys add|list|revoke|rotate "
                     "[--config PATH] ...; fastgate usage [--since DATE] [--by user|model|key] [--json] "
                     "[--config PATH]. Each has --help.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in (("serve", "run the proxy in the foreground"),
                            ("check-config", "validate the config file and exit")):
        cmd = commands.add_parser(name, help=help_text)
        cmd.add_argument("--config", metavar="PATH", help="TOML config file (default: ./fastgate.toml if present)")
        cmd.add_argument("--listen", metavar="HOST:PORT", help="override server.listen")
        cmd.add_argument("--upstream", metavar="URL", help="override upstream.url")
    return parser


def _store_command(command: str, argv: list[str]) -> int:
    """`fastgate keys ...` / `fastgate usage ...`: find the store through the config, then hand over."""
    config_path = None
    rest = []
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            config_path = next(args, None)
        elif arg.startswith("--config="):
            config_path = arg.partition("=")[2]
        else:
            rest.append(arg)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"fastgate: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from . import admin
    run = admin.keys_command if command == "keys" else admin.usage_command
    return run(rest, store_path=config.store.path, out=sys.stdout, err=sys.stderr, now=time.time())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("keys", "usage"):
        return _store_command(argv[0], argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    def read_config() -> Config:
        return with_overrides(load_config(args.config), listen=args.listen, upstream=args.upstream)

    try:
        config = read_config()
        if config.server.tls:
            from .tls import server_context
            server_context(config.server.tls_cert, config.server.tls_key)
    except ConfigError as exc:
        print(f"fastgate: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        print(f"config OK ({config.source or 'defaults'}): listen {config.server.listen}, "
              f"upstream {config.upstream.url}, {len(config.keys)} keys")
        return EXIT_OK
    setup_logging(config.log.level)
    from .server import run
    if args.config is None and config.source:
        args.config = config.source  # found ./fastgate.toml: a reload re-reads that same file
    try:
        run(config, reread=read_config)
    except OSError as exc:
        print(f"fastgate: cannot listen on {config.server.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
