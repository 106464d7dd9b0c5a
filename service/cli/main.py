"""The `relay` command. Each subcommand is a small function; user mistakes exit 2 with one line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from service.cli import batches as batch_cli
from service.cli import destinations, retention
from service.cli import operators as console
from service.cli.archive import add_archive_arguments, cmd_archive
from service.cli.privacy import add_forget_arguments, cmd_forget, cmd_rotate_keys
from service.core.auth import DEFAULT_TTL, mint_token
from service.core.errors import ConfigError
from service.core.settings import SERVE_FLAGS, load_settings, tool_settings
from service.db import database
from service.usage import report as usage


def cmd_serve(args: argparse.Namespace) -> int:
    from service.web.server import serve

    given = {flag.variable: getattr(args, flag.variable) for flag in SERVE_FLAGS}
    serve(load_settings(overrides={name: str(value) for name, value in given.items() if value is not None}))
    return 0


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for flag in SERVE_FLAGS:
        hint = " (visible in ps: prefer the environment)" if flag.secret else ""
        parser.add_argument(
            flag.name,
            dest=flag.variable,
            type=flag.type,
            metavar="N" if flag.type is int else "VALUE",
            help=f"{flag.variable}: {flag.help}{hint}",
        )


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = tool_settings()
    with database.database_dsn(settings) as dsn:
        asyncio.run(database.require_writable(dsn))
        applied = asyncio.run(database.migrate(dsn))
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    settings = tool_settings()
    try:
        when = usage.period(args.since, args.until, args.group)
    except usage.UsageInputError as error:
        raise ConfigError(f"--{error}") from None

    async def fetch(dsn: str) -> dict[str, Any]:
        conn = await database.connect(dsn)
        try:
            return await usage.report(conn, when, settings.prices)
        finally:
            await conn.close()

    with database.database_dsn(settings) as dsn:
        report = asyncio.run(fetch(dsn))
    print(json.dumps(report, indent=2) if args.json else usage.format_table(report))
    return 0


def add_usage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", help="ISO 8601 date or time (default: start of this UTC month)")
    parser.add_argument("--until", help="ISO 8601 date or time, exclusive (default: now)")
    parser.add_argument("--group", choices=usage.GROUPS, default="model")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_token(args: argparse.Namespace) -> int:
    settings = load_settings(required=("subscribe_key",))
    if args.ttl <= 0:
        raise ConfigError("--ttl must be a positive number of seconds")
    print(mint_token(settings.subscribe_key, args.prediction, args.ttl))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from service.ops.simulate import run_simulation

    # A sender needs no server secrets: only --secret, or the configured or stored webhook secret.
    return run_simulation(args, tool_settings())


def cmd_reconcile(args: argparse.Namespace) -> int:
    from service.upstream.reconcile import run_reconcile

    return run_reconcile(args.prediction, tool_settings())


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="webhook URL (default: this instance's)")
    parser.add_argument("--predictions", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--rate", type=float, default=0.0, help="deliveries per second (0: as fast as possible)"
    )
    parser.add_argument("--duplicates", type=float, default=0.0, help="share of deliveries sent twice")
    parser.add_argument("--reorder", type=float, default=0.0, help="share of lifecycles sent out of order")
    parser.add_argument(
        "--failures", type=float, default=0.0, help="share of predictions that fail or cancel"
    )
    parser.add_argument("--secret", help="whsec_… to sign with (default: the configured or dev secret)")
    parser.add_argument("--seed", type=int, help="random seed, for a repeatable run")
    parser.add_argument("--report", help="write acknowledged webhook-ids and outcomes to this JSON file")
    parser.add_argument(
        "--serve-outputs",
        action="store_true",
        help="serve outputs as real PNGs from 127.0.0.1 (Relay's port + 1: a dev instance archives them)",
    )
    parser.add_argument(
        "--outputs-port", type=int, help="port for --serve-outputs (default: Relay's port + 1)"
    )
    parser.add_argument(
        "--serve-for", type=float, default=60.0, help="seconds to keep serving outputs until all are fetched"
    )


COMMANDS: list[console.Command] = [
    ("serve", "run the HTTP/WebSocket service", cmd_serve, add_serve_arguments),
    ("migrate", "apply database migrations", cmd_migrate, None),
    (
        "token",
        "mint a subscriber token",
        cmd_token,
        lambda p: (
            p.add_argument("prediction", help="a prediction id, or * for all"),
            p.add_argument("--ttl", type=int, default=DEFAULT_TTL, help="lifetime in seconds"),
        ),
    ),
    ("simulate", "send realistic signed Replicate lifecycles", cmd_simulate, add_simulate_arguments),
    ("usage", "predictions, predict time and estimated cost", cmd_usage, add_usage_arguments),
    (
        "reconcile",
        "fetch open predictions from Replicate and log what deliveries missed",
        cmd_reconcile,
        lambda p: p.add_argument(
            "prediction", nargs="?", help="one prediction id (default: all open past RELAY_RECONCILE_AFTER)"
        ),
    ),
    ("forget", "erase predictions' content by destroying their data keys", cmd_forget, add_forget_arguments),
    ("rotate-keys", "re-wrap every data key under the current RELAY_ENCRYPTION_KEY", cmd_rotate_keys, None),
    ("archive", "output archive: status of downloads, retry failed ones", cmd_archive, add_archive_arguments),
    *console.COMMANDS,
    *retention.COMMANDS,
    *batch_cli.COMMANDS,
    *destinations.COMMANDS,
]


class Parser(argparse.ArgumentParser):
    """argparse with one-line mistakes: `relay events: error: …`, not the usage block first."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # Each subcommand's parser refuses its own unknown flags, so the line names the command.
        given = argparse.Namespace() if namespace is None else namespace  # as argparse itself does
        parsed, extras = super().parse_known_args(args, given)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="relay", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, func, add_arguments in COMMANDS:
        command = sub.add_parser(name, help=help_text)
        if add_arguments is not None:
            add_arguments(command)
        command.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ConfigError as error:
        print(f"relay: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
