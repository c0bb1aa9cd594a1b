"""Command line: `fastgate [--config PATH] COMMAND ...` with COMMAND one of serve, check-config, keys, usage,
init, reload; `fastgate --version`.

`main(argv) -> int` is the only place that prints usage errors and picks exit codes. `--config PATH` is taken
before the command (`fastgate --config X keys list`) as well as after it (`fastgate keys list --config X`); the
one after the command wins.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from . import __version__
from .config import (
    DEFAULT_CONFIG_FILE, Config, ConfigError, load_config, parse_host_port, parse_upstream_url, with_overrides,
)
from .logs import setup_logging

EXIT_OK = 0
EXIT_FAILED = 1  # understood, but it could not be done (a file exists, no gateway runs, cannot listen)
EXIT_CONFIG = 2  # usage or config error

CONFIG_HELP = f"TOML config file (default: ./{DEFAULT_CONFIG_FILE} if present)"
STORE_COMMANDS = ("keys", "usage")  # parsed by fastgate.admin, which opens the store the config names
INIT_USER = "admin"  # the user name of the key `fastgate init` creates (it shows in logs and metrics)


def _add_config(cmd: argparse.ArgumentParser, help_text: str = CONFIG_HELP) -> None:
    cmd.add_argument("--config", metavar="PATH", help=help_text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgate", description="API-key edge in front of Ollama.")
    parser.add_argument("--version", action="version", version=f"fastgate {__version__}")
    # A different dest from the commands' --config: argparse lets a subparser's default overwrite the value
    # given before the command otherwise.
    parser.add_argument("--config", metavar="PATH", dest="global_config",
                        help=f"{CONFIG_HELP}; for every command, given before or after it")
    parser.epilog = ("Each command has --help. A first request in a minute: fastgate init, then fastgate serve, "
                     "then the curl command init prints.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in (("serve", "run the proxy in the foreground"),
                            ("check-config", "validate the config file, say what it puts in effect, and exit")):
        cmd = commands.add_parser(name, help=help_text, description=help_text)
        _add_config(cmd)
        cmd.add_argument("--listen", metavar="HOST:PORT", help="override server.listen")
        cmd.add_argument("--upstream", metavar="URL", help="override upstream.url")
        cmd.add_argument("--allow-example-keys", action="store_true",
                         help="start even with keys of config.toml.example (public) on a listener that is not "
                              "loopback")
    # keys and usage are parsed by fastgate.admin (see main); listed here so that --help shows them.
    commands.add_parser("keys", add_help=False,
                        help="add, list, rotate, revoke or import API keys in the key store ([store] path)")
    commands.add_parser("usage", add_help=False,
                        help="requests and tokens per user, model, key or backend; usage prune deletes old rows")
    init = commands.add_parser("init", help="write a new config with a fresh API key and print the key once",
                               description="Write a new config file holding one fresh admin API key (as its "
                                           "SHA-256 digest) and print the key once. Never overwrites a file.")
    _add_config(init, f"file to create (default: ./{DEFAULT_CONFIG_FILE})")
    init.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:8000",
                      help="server.listen to write (default: 127.0.0.1:8000)")
    init.add_argument("--upstream", metavar="URL", default="http://127.0.0.1:11434",
                      help="Ollama's URL to write (default: http://127.0.0.1:11434)")
    init.add_argument("--user", default=INIT_USER, help=f"user name of the key (default: {INIT_USER})")
    reload = commands.add_parser("reload", help="make the running gateway re-read its config (SIGHUP)",
                                 description="Check the config file, then send SIGHUP to the fastgate named by "
                                             "its [server] pid_file.")
    _add_config(reload)
    return parser


def _split_global_config(argv: list[str]) -> tuple[str | None, int]:
    """`--config PATH` given before the command, and the index of the command (len(argv) if none)."""
    config: str | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            config, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            config, i = arg.partition("=")[2], i + 1
        else:
            break
    return config, i


def _store_command(command: str, argv: list[str], config_path: str | None) -> int:
    """`fastgate keys ...` / `fastgate usage ...`: find the store through the config, then hand over."""
    rest = []
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            config_path = next(args, None)
            if config_path is None:
                print(f"fastgate {command}: error: --config needs a PATH", file=sys.stderr)
                return EXIT_CONFIG
        elif arg.startswith("--config="):
            config_path = arg.partition("=")[2]
        else:
            rest.append(arg)
    from . import admin
    now = time.time()
    if "-h" in rest or "--help" in rest:  # help needs no config (and must work while the config is broken)
        run = admin.keys_command if command == "keys" else admin.usage_command
        return run(rest, store_path="", out=sys.stdout, err=sys.stderr, now=now)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"fastgate: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from .state.stores import pg_spill_file
    where = {"store_path": config.store.path, "store_url": config.store.url,
             "spill_file": pg_spill_file(config.source)}
    if command == "keys":
        return admin.keys_command(rest, out=sys.stdout, err=sys.stderr, now=now, config_keys=config.keys,
                                  config_path=config.source, **where)
    return admin.usage_command(rest, out=sys.stdout, err=sys.stderr, now=now, **where)


def _init(args: argparse.Namespace, config_path: str | None) -> int:
    from .startup import write_initial_config
    path = config_path or DEFAULT_CONFIG_FILE
    try:
        listen = parse_host_port("--listen", args.listen)
        upstream = parse_upstream_url("--upstream", args.upstream)
    except ConfigError as exc:
        print(f"fastgate: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not args.user or args.user != args.user.strip() or not args.user.isprintable():
        print(f"fastgate: --user: expected printable text without surrounding spaces, got {args.user!r}",
              file=sys.stderr)
        return EXIT_CONFIG
    try:
        secret = write_initial_config(path, user=args.user, listen=listen, upstream=upstream, now=time.time())
    except FileExistsError:
        print(f"fastgate: {path} already exists: not overwriting it (remove it, or name another file with "
              f"--config)", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"fastgate: cannot create {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    serve = "fastgate serve" if path == DEFAULT_CONFIG_FILE else f"fastgate serve --config {path}"
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    if host in ("0.0.0.0", "[::]"):
        host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
    print(f"Wrote {path}: listen {listen}, upstream {upstream}, one admin key for {args.user!r} (the file "
          f"holds only its SHA-256 digest).")
    print(f"API key: {secret}")
    print("Store it now: it will not be shown again.")
    print()
    print(f"Start:  {serve}")
    print(f"Chat:   curl -N http://{host}:{listen.port}/api/chat -H \"X-API-Key: $FASTGATE_KEY\" \\")
    print("          -d '{\"model\": \"llama3.2\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'")
    print("        (FASTGATE_KEY set to the key above; any model `ollama list` shows)")
    return EXIT_OK


def _reload(config_path: str | None) -> int:
    from .pidfile import PidFileError, signal_gateway
    try:
        config = load_config(config_path)  # a file that does not load would only make the reload fail
    except ConfigError as exc:
        print(f"fastgate: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    where = config.source or "the config (none found: defaults)"
    if not config.server.pid_file:
        print(f"fastgate: server.pid_file is not set in {where}: set it (pid_file = \"fastgate.pid\" writes it "
              f"next to the config) and restart fastgate, or send the signal yourself: kill -HUP <pid>",
              file=sys.stderr)
        return EXIT_CONFIG
    try:
        pid = signal_gateway(config.server.pid_file)
    except PidFileError as exc:
        print(f"fastgate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"Sent SIGHUP to fastgate (pid {pid}): it re-reads its config now; its log says \"Reloaded\", or "
          f"\"Reload failed\" with the reason (the running config then stays).")
    return EXIT_OK


def _check_config(config: Config) -> int:
    from .pidfile import PidFileError, process_state, read_pid
    from .startup import example_key_warnings, forwarding_to, in_effect, probe_backends
    from .store import StoreError, count_active_keys
    store_keys: int | str | None = None
    if config.store.path:
        try:
            count = count_active_keys(config.store.path, time.time())
            store_keys = "none yet (no file)" if count is None else count
        except StoreError as exc:
            store_keys = f"unreadable ({exc})"
    elif config.store.url:
        try:
            from .state.postgres_store import count_active_keys as count_in_database
            count = count_in_database(config.store.url, time.time())
            store_keys = "none yet (no tables)" if count is None else count
        except ImportError:
            store_keys = "unknown (psycopg is not installed: pip install 'fastgate[postgres]')"
        except StoreError as exc:
            store_keys = f"unreadable ({exc})"
    running = ""
    if config.server.pid_file:
        try:
            pid = read_pid(config.server.pid_file)
        except PidFileError as exc:
            running = f"; {exc}"
        else:
            alive = pid is not None and process_state(pid) == "fastgate"
            running = (f"; running as pid {pid} (pid file {config.server.pid_file})" if alive
                       else f"; not running (pid file {config.server.pid_file})")
    ollama = asyncio.run(probe_backends(config))
    print(f"config OK ({config.source or 'defaults'}): listen {config.server.listen}, "
          f"upstream {forwarding_to(config)}, {len(config.keys)} keys")
    print(f"In effect: {in_effect(config, ollama=ollama, store_keys=store_keys)}{running}")
    for line in example_key_warnings(config):
        print(f"fastgate: warning: {line}", file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    global_config, command_at = _split_global_config(argv)
    if command_at < len(argv) and argv[command_at] in STORE_COMMANDS:
        return _store_command(argv[command_at], argv[command_at + 1:], global_config)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    config_path: str | None = args.config or args.global_config
    if args.command == "init":
        return _init(args, config_path)
    if args.command == "reload":
        return _reload(config_path)

    def read_config() -> Config:
        from .startup import refuse_example_keys
        config = with_overrides(load_config(config_path), listen=args.listen, upstream=args.upstream)
        refuse_example_keys(config, allowed=args.allow_example_keys)
        return config

    try:
        config = read_config()
        if config.server.tls:
            from .tls import server_context
            server_context(config.server.tls_cert, config.server.tls_key)
    except ConfigError as exc:
        print(f"fastgate: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        return _check_config(config)
    setup_logging(config.log.level)
    from .pidfile import PidFileError
    from .server import run
    from .store import StoreError
    from .supervisor import WorkersFailed, supervise
    if config_path is None and config.source:
        config_path = config.source  # found ./fastgate.toml: a reload re-reads that same file
    try:
        if config.server.workers > 1:
            supervise(config, reread=read_config)
        else:
            run(config, reread=read_config)
    except WorkersFailed as exc:
        print(f"fastgate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ConfigError as exc:  # found only once serving starts (the key store cannot be opened)
        print(f"fastgate: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreError as exc:  # the key store's database is down at start: later may work (not status 2)
        print(f"fastgate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except PidFileError as exc:
        print(f"fastgate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"fastgate: cannot listen on {config.server.listen}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        pass
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
