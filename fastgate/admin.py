"""Operator commands on the key store: `fastgate keys add|list|revoke|rotate|import` and `fastgate usage
[prune]`.

Each command is a function of (argv, store path, output streams, now) returning an exit code, so `cli.main`
only dispatches and tests run it in-process. Nothing here touches sys.stdout, sys.stderr or sys.exit.
Secrets are printed exactly once, when a key is created or rotated; lists show the display prefix only.
All times are shown and parsed in UTC.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, NoReturn, TextIO

from .keys import mask
from .state.stores import Store, open_store_at
from .store import (
    DISPLAY_PREFIX_CHARS, PRUNE_BATCH_ROWS, ROLES, USAGE_GROUPS, KeyRecord, StoreError, secret_digest,
)

EXIT_OK = 0
EXIT_ERROR = 1  # the command was understood but failed (unknown id, unreadable store)
EXIT_USAGE = 2  # bad arguments or no store configured

_DURATION = re.compile(r"(?P<n>[0-9]+)(?P<unit>[smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
NO_STORE = "no key store configured: set [store] path in the config file"
# --config is taken out of the arguments by cli.main before these parsers see them (it must be read first, to
# find the store); it is declared here too so that every --help shows it.
CONFIG_HELP = "config file naming the key store (default: ./fastgate.toml); also accepted before the command"
_DIGEST_KEY = re.compile(r"sha256:([0-9a-fA-F]{64})")


class _ParserExit(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing and exiting, so the caller picks the stream and exit code."""

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _ParserExit(status, message or "")

    def error(self, message: str) -> NoReturn:
        raise _ParserExit(EXIT_USAGE, f"{self.format_usage()}{self.prog}: error: {message}\n")

    def print_help(self, file: Any = None) -> NoReturn:  # --help: text to `out`, exit 0
        raise _ParserExit(EXIT_OK, self.format_help())


# ---------------------------------------------------------------------------------------------------------
# Argument types (raise ArgumentTypeError, which argparse turns into a usage error)

def parse_duration(text: str) -> float:
    """`30d`, `12h`, `90m`, `45s`, `2w` -> seconds (> 0)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match["n"]) == 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 30d, 12h, 90m, 45s or 2w, got {text!r}")
    return float(int(match["n"]) * _UNIT_S[match["unit"]])


def parse_since(text: str, now: float) -> float:
    """A UTC date (`2026-11-01`), an ISO date-time (`2026-11-01T12:00`, offsets allowed), or a duration back
    from now (`7d`) -> epoch seconds."""
    if _DURATION.fullmatch(text.strip()):
        return now - parse_duration(text)
    try:
        # Python 3.10's fromisoformat does not take a trailing Z.
        when = datetime.fromisoformat(text.strip().removesuffix("Z").removesuffix("z"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a date (2026-11-01), a date-time (2026-11-01T12:00) or a duration (7d), got {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _patterns(text: str) -> tuple[str, ...]:
    patterns = tuple(p.strip() for p in text.split(","))
    if not all(patterns) or any(" " in p for p in patterns):
        raise argparse.ArgumentTypeError(f"expected comma-separated model patterns like 'llama3*,qwen2.5:7b', "
                                         f"got {text!r}")
    return patterns


# ---------------------------------------------------------------------------------------------------------
# Formatting

def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[str] = frozenset()) -> str:
    """Columns padded to their widest cell; columns named in `right` (numbers) are right-aligned."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if h in right else c.ljust(w)
                         for h, c, w in zip(headers, cells, widths)).rstrip()

    return "\n".join([line(headers), *map(line, rows)]) + "\n"


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


def _key_json(record: KeyRecord, now: float) -> dict[str, Any]:
    return {"id": record.id, "user": record.user, "role": record.role, "prefix": record.prefix,
            "status": record.status(now), "created_at": _iso(record.created_at),
            "last_used_at": _iso(record.last_used_at), "expires_at": _iso(record.expires_at),
            "models": list(record.models), "rpm": record.rpm, "max_concurrent": record.max_concurrent,
            "tokens_per_day": record.tokens_per_day}


def _print_secret(out: TextIO, record: KeyRecord, secret: str, what: str) -> None:
    print(f"{what} key {record.id} for {record.user} (role {record.role}).", file=out)
    print(f"API key: {secret}", file=out)
    print("Store it now: it will not be shown again.", file=out)


def _print_secret_json(out: TextIO, record: KeyRecord, secret: str, now: float) -> None:
    """For scripts: one JSON object, id, user, role and the key first, then what `keys list --json` shows."""
    listed = _key_json(record, now)
    print(json.dumps({"id": listed.pop("id"), "user": listed.pop("user"), "role": listed.pop("role"),
                      "key": secret, **listed}, indent=2), file=out)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help=CONFIG_HELP)


# ---------------------------------------------------------------------------------------------------------
# fastgate keys ...

def _keys_parser() -> _Parser:
    parser = _Parser(prog="fastgate keys", description="Manage API keys in the key store.")
    _add_config(parser)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="create a key and print it once")
    _add_config(add)
    add.add_argument("user")
    add.add_argument("--role", choices=ROLES, default="user")
    add.add_argument("--models", type=_patterns, default=(), metavar="PATTERNS",
                     help="comma-separated model globs the key may use (default: all)")
    add.add_argument("--expires", type=parse_duration, metavar="DURATION", help="lifetime, e.g. 30d, 12h, 90m")
    add.add_argument("--rpm", type=_positive_int, metavar="N", help="requests per minute")
    add.add_argument("--max-concurrent", type=_positive_int, metavar="N", help="requests in flight at once")
    add.add_argument("--tokens-per-day", type=_positive_int, metavar="N", help="prompt + completion tokens")
    add.add_argument("--json", action="store_true", help="print one JSON object (id, user, role, key, ...)")
    listing = actions.add_parser("list", help="show keys (never their secrets)")
    _add_config(listing)
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    revoke = actions.add_parser("revoke", help="disable a key for good")
    _add_config(revoke)
    revoke.add_argument("id")
    rotate = actions.add_parser("rotate", help="give a key a new secret (the old one stops working)")
    _add_config(rotate)
    rotate.add_argument("id")
    rotate.add_argument("--json", action="store_true", help="print one JSON object (id, user, role, key, ...)")
    imports = actions.add_parser(
        "import", help="copy the config file's [keys] into the store (digests only; running it again adds nothing)",
        description="Copy the [keys] of the config file into the key store, as SHA-256 digests, with their user "
                    "names. Keys the store already holds (revoked ones too) are left as they are. Then remove "
                    "[keys] from the file and reload.")
    _add_config(imports)
    imports.add_argument("--role", choices=ROLES, default="admin",
                         help="role of the imported keys (default: admin, as keys in the config file act)")
    return parser


def _keys_add(store: Store, args: argparse.Namespace, out: TextIO, now: float) -> int:
    record, secret = store.add(args.user, role=args.role, models=args.models,
                               expires_at=None if args.expires is None else now + args.expires,
                               rpm=args.rpm, max_concurrent=args.max_concurrent,
                               tokens_per_day=args.tokens_per_day, now=now)
    if args.json:
        _print_secret_json(out, record, secret, now)
        return EXIT_OK
    _print_secret(out, record, secret, "Created")
    if record.expires_at is not None:
        print(f"It expires {_when(record.expires_at)} UTC.", file=out)
    return EXIT_OK


def _keys_list(store: Store, args: argparse.Namespace, out: TextIO, now: float) -> int:
    records = store.list(include_revoked=args.all)
    if args.json:
        print(json.dumps([_key_json(r, now) for r in records], indent=2), file=out)
        return EXIT_OK
    if not records:
        print("No keys." if args.all else "No active keys (--all shows revoked ones).", file=out)
        return EXIT_OK
    headers = ("ID", "USER", "ROLE", "PREFIX", "STATUS", "CREATED", "LAST USED", "EXPIRES", "MODELS", "RPM",
               "CONCURRENT", "TOKENS/DAY")
    rows = [(r.id, r.user, r.role, r.prefix + "...", r.status(now), _when(r.created_at), _when(r.last_used_at),
             _when(r.expires_at), ",".join(r.models) or "*", _limit(r.rpm), _limit(r.max_concurrent),
             _limit(r.tokens_per_day)) for r in records]
    out.write(_table(headers, rows, right=frozenset({"RPM", "CONCURRENT", "TOKENS/DAY"})))
    return EXIT_OK


def _keys_revoke(store: Store, args: argparse.Namespace, out: TextIO, now: float) -> int:
    was_revoked = store.get(args.id).revoked
    record = store.revoke(args.id, now)
    if was_revoked:
        print(f"Key {record.id} ({record.user}) was already revoked.", file=out)
    else:
        print(f"Revoked key {record.id} ({record.user}); a running fastgate refuses it within seconds.", file=out)
    return EXIT_OK


def _keys_rotate(store: Store, args: argparse.Namespace, out: TextIO, now: float) -> int:
    record, secret = store.rotate(args.id, now)
    if args.json:
        _print_secret_json(out, record, secret, now)
        return EXIT_OK
    _print_secret(out, record, secret, "Rotated")
    print("The previous secret of this key no longer works.", file=out)
    return EXIT_OK


def _config_entry(entry: str) -> tuple[str, str, str]:
    """A [keys] entry -> (sha256 hex, display prefix, label for output). Never the key itself: the prefix is at
    most a quarter of a clear key (DISPLAY_PREFIX_CHARS at most), and a digest entry has none."""
    match = _DIGEST_KEY.fullmatch(entry)
    if match is not None:
        digest = match.group(1).lower()
        return digest, "", f"sha256:{digest[:8]}..."
    return secret_digest(entry), entry[:min(DISPLAY_PREFIX_CHARS, len(entry) // 4)], mask(entry)


def _keys_import(store: Store, args: argparse.Namespace, out: TextIO, now: float, config_keys: Mapping[str, str],
                 config_path: str) -> int:
    source = config_path or "the config file"
    if not config_keys:
        print(f"No [keys] in {source}: nothing to import.", file=out)
        return EXIT_OK
    entries = [(*_config_entry(entry)[:2], user) for entry, user in config_keys.items()]
    labels = [_config_entry(entry)[2] for entry in config_keys]
    results = store.import_digests(entries, role=args.role, now=now)
    added = 0
    for (_, _, user), label, (record, new) in zip(entries, labels, results):
        if new:
            added += 1
            print(f"Imported {label} for {record.user} as key {record.id} (role {record.role}).", file=out)
            continue
        note = f"Already in the store: {label} is key {record.id} ({record.user}, role {record.role})"
        if record.user != user:
            note += f"; the file names it {user!r}, the store's user stays"
        if record.revoked:
            note += "; REVOKED there: it works only while the file still holds it, and stops once removed"
        print(note + ".", file=out)
    print(f"Imported {added} of {len(entries)} keys from {source} ({len(entries) - added} were already in the "
          f"store, which keeps only their SHA-256 digests).", file=out)
    print(f"Next: remove the [keys] table from {source} (the store holds these keys now; while both do, the "
          f"store's entry is the one in force), then reload: fastgate reload --config {source} (needs [server] "
          f"pid_file; otherwise kill -HUP <pid>). Manage them from then on with fastgate keys list/rotate/revoke.",
          file=out)
    return EXIT_OK


_KEY_ACTIONS: dict[str, Callable[[Store, argparse.Namespace, TextIO, float], int]] = {
    "add": _keys_add, "list": _keys_list, "revoke": _keys_revoke, "rotate": _keys_rotate}


def keys_command(argv: list[str], *, store_path: str, out: TextIO, err: TextIO, now: float,
                 config_keys: Mapping[str, str] | None = None, config_path: str = "", store_url: str = "",
                 spill_file: str = "") -> int:
    """`fastgate keys ACTION ...` (argv without the leading "keys"). `config_keys` and `config_path`: the
    config file's [keys] and where it is, for `keys import`."""
    def act(store: Store, args: argparse.Namespace) -> int:
        if args.action == "import":
            return _keys_import(store, args, out, now, config_keys or {}, config_path)
        return _KEY_ACTIONS[args.action](store, args, out, now)

    return _run(_keys_parser(), argv, act, store_path=store_path, out=out, err=err, store_url=store_url,
                spill_file=spill_file)


# ---------------------------------------------------------------------------------------------------------
# fastgate usage ...

def _usage_parser(now: float) -> _Parser:
    parser = _Parser(prog="fastgate usage", description="Requests and tokens per user, model, key or backend.",
                     epilog="fastgate usage prune --before DATE deletes older usage rows (see its --help).")
    _add_config(parser)
    parser.add_argument("--since", type=lambda text: parse_since(text, now), metavar="DATE",
                        help="only usage at or after DATE: 2026-11-01, 2026-11-01T12:00 (UTC unless an offset "
                             "is given) or a duration back from now like 7d")
    parser.add_argument("--by", choices=tuple(USAGE_GROUPS), default="user")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _usage(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    summaries = store.usage(since=args.since, by=args.by)
    # A key id alone says little: name its user (usage of config-file keys has no store id).
    owners = {r.id: r.user for r in store.list(include_revoked=True)} if args.by == "key" else {}
    if args.json:
        objects = [{args.by: s.group, **({"user": owners.get(s.group)} if args.by == "key" else {}),
                    "requests": s.requests, "prompt_tokens": s.prompt_tokens,
                    "completion_tokens": s.completion_tokens, "total_tokens": s.total_tokens,
                    "duration_ms": round(s.duration_ms, 3), "errors": s.errors} for s in summaries]
        print(json.dumps({"since": _iso(args.since), "by": args.by, "rows": objects}, indent=2), file=out)
        return EXIT_OK
    since = f" since {_when(args.since)} UTC" if args.since is not None else ""
    if not summaries:
        print(f"No usage recorded{since}.", file=out)
        return EXIT_OK
    numbers = ("REQUESTS", "ERRORS", "PROMPT TOKENS", "COMPLETION TOKENS", "TOTAL TOKENS", "DURATION S")
    labels = (args.by.upper(), "USER") if args.by == "key" else (args.by.upper(),)
    # "" is a config-file key's id, or no backend (rows from before several backends, refusals placed nowhere)
    rows = [(*((s.group or "(config)", owners.get(s.group, "-")) if args.by == "key" else
               (s.group or "-",) if args.by == "backend" else (s.group,)),
             str(s.requests), str(s.errors), str(s.prompt_tokens), str(s.completion_tokens),
             str(s.total_tokens), f"{s.duration_ms / 1000:.1f}") for s in summaries]
    total = ("TOTAL", *[""] * (len(labels) - 1),
             *(str(sum(getattr(s, f) for s in summaries))
               for f in ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens")),
             f"{sum(s.duration_ms for s in summaries) / 1000:.1f}")
    if since:
        print(f"Usage{since}:", file=out)
    out.write(_table((*labels, *numbers), [*rows, total], right=frozenset(numbers)))
    return EXIT_OK


def _prune_parser(now: float) -> _Parser:
    parser = _Parser(prog="fastgate usage prune", description="Delete usage rows recorded before DATE, and say "
                     "how many went. [store] usage_retention_days makes a running fastgate do this once a day.")
    _add_config(parser)
    parser.add_argument("--before", type=lambda text: parse_since(text, now), metavar="DATE", required=True,
                        help="2026-11-01, 2026-11-01T12:00 (UTC unless an offset is given) or a duration back "
                             "from now like 90d")
    return parser


def _prune(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    deleted = 0
    while True:  # in batches: a running fastgate's usage writes wait for each batch, never for the whole delete
        batch = store.prune_usage(args.before, PRUNE_BATCH_ROWS)
        deleted += batch
        if batch < PRUNE_BATCH_ROWS:
            break
    print(f"Deleted {deleted} usage rows recorded before {_when(args.before)} UTC.", file=out)
    return EXIT_OK


def usage_command(argv: list[str], *, store_path: str, out: TextIO, err: TextIO, now: float,
                  store_url: str = "", spill_file: str = "") -> int:
    """`fastgate usage [--since DATE] [--by user|model|key|backend] [--json]` or `fastgate usage prune --before DATE`
    (argv without the leading "usage")."""
    if argv[:1] == ["prune"]:
        return _run(_prune_parser(now), argv[1:], lambda store, args: _prune(store, args, out),
                    store_path=store_path, out=out, err=err, store_url=store_url, spill_file=spill_file)
    return _run(_usage_parser(now), argv, lambda store, args: _usage(store, args, out),
                store_path=store_path, out=out, err=err, store_url=store_url, spill_file=spill_file)


# ---------------------------------------------------------------------------------------------------------

def _run(parser: _Parser, argv: list[str], action: Callable[[Store, argparse.Namespace], int], *,
         store_path: str, out: TextIO, err: TextIO, store_url: str = "", spill_file: str = "") -> int:
    """Parse, open the store (`store_path`: SQLite, or `store_url`: PostgreSQL), act, close: the one place
    these commands turn failures into exit codes. A store that cannot be reached is one line on `err`."""
    try:
        args = parser.parse_args(argv)
    except _ParserExit as exc:
        (out if exc.status == EXIT_OK else err).write(exc.message)
        return exc.status
    if not store_path and not store_url:
        print(f"fastgate: {NO_STORE}", file=err)
        return EXIT_USAGE
    try:
        store = open_store_at(path=store_path, url=store_url, spill_file=spill_file)
        try:
            return action(store, args)
        finally:
            store.close()
    except StoreError as exc:
        print(f"fastgate: {exc}", file=err)
        return EXIT_ERROR
