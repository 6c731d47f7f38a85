"""The ``wsproxy`` command: parse arguments, then run, check, or call the admin API. Nothing else.

    wsproxy run -c FILE                    serve until SIGTERM or SIGINT
    wsproxy check -c FILE [--dump]         validate a config: exit 0, or print every error and exit 1
    wsproxy reload -c FILE                 make the running proxy reload FILE; exit 0 only when applied
    wsproxy status -c FILE                 what the running proxy serves
    wsproxy drain|undrain -c FILE POOL BACKEND
    wsproxy sessions -c FILE [--route R] [--pool P] [--backend B] [--identity I] [--peer A] [--json]
    wsproxy kick -c FILE (--session ID | --identity NAME) [--code N] [--reason TEXT]
    wsproxy upgrade -c FILE                start a new generation of processes (workers > 1)
    wsproxy --version

``-c`` defaults to /etc/wsproxy/wsproxy.yaml. The operator commands live in
``wsproxy.cli``; the man page (``man/wsproxy.1``) is generated from this parser
by ``python -m wsproxy.manpage``.
"""

from __future__ import annotations

import argparse
import sys

from typing import TYPE_CHECKING

from .cli import DEFAULT_CONFIG, CommandFailed, version_text

if TYPE_CHECKING:
    from .config.schema import Config

RUN_DESCRIPTION = """\
Serve WebSocket connections as FILE says, until SIGTERM or SIGINT.

Signals:
  SIGHUP          reload FILE (loaded in a thread, applied atomically, or
                  logged and refused: the old config keeps serving);
                  `wsproxy reload` does the same and waits for the outcome
  SIGTERM, SIGINT graceful shutdown: stop accepting, close sessions with 1001
                  spread over shutdown.spread, wait up to shutdown.timeout;
                  a second signal exits at once
  SIGUSR2         (workers > 1, to the supervisor) upgrade: start a new
                  supervisor and workers on the same sockets; the old
                  workers keep their sessions up to upgrade.timeout

Exit status:
  0  stopped after a signal
  1  the config has errors, or a listener or the admin listener cannot bind
  2  usage error
"""

EPILOG = f"""\
FILE defaults to {DEFAULT_CONFIG}. Exit status: 0 success; 1 config errors,
a refused reload or an admin API that cannot be reached; 2 usage error.
"""


#: Commands wsproxy runs itself, not people (not in the help or the man page).
INTERNAL_COMMANDS = frozenset({"worker"})


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", default=DEFAULT_CONFIG, metavar="FILE", help=f"the YAML config file (default: {DEFAULT_CONFIG})"
    )


def parser() -> argparse.ArgumentParser:
    """The whole command line (the man page is generated from it)."""
    top = argparse.ArgumentParser(
        prog="wsproxy",
        description="WebSocket reverse proxy and load balancer",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=version_text())
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter
    run = commands.add_parser("run", help="serve until SIGTERM or SIGINT", description=RUN_DESCRIPTION, formatter_class=raw)
    _config_option(run)
    run.add_argument(
        "--log-level", default=None, choices=["debug", "info", "warning", "error"], help="overrides log.level"
    )
    check = commands.add_parser(
        "check", help="validate a config file and exit",
        description="Validate FILE (and the files it includes and names) as `run` would; print every error"
        " as FILE:LINE:COL: PATH: MESSAGE and exit 1, or exit 0.",
    )
    _config_option(check)
    check.add_argument(
        "--dump", action="store_true", help="print the effective config as YAML (defaults filled in, secrets redacted)"
    )
    reload = commands.add_parser(
        "reload", help="make the running proxy reload its config and wait for the outcome",
        description="Ask the proxy running FILE to reload it (POST /reload on its admin API, the same reload as"
        " SIGHUP) and wait: exit 0 when the new config was applied, 1 with its errors otherwise.",
    )
    _config_option(reload)
    status = commands.add_parser(
        "status", help="show what the running proxy serves",
        description="Print the running proxy's listeners, pools and backends (GET /status on its admin API).",
    )
    _config_option(status)
    status.add_argument("--json", action="store_true", help="print the JSON document as the admin API gives it")
    for name, verb in (("drain", "stop sending new sessions to"), ("undrain", "send new sessions again to")):
        action = commands.add_parser(
            name, help=f"{verb} a backend",
            description=f"{verb.capitalize()} BACKEND of POOL in the running proxy (POST"
            f" /pools/POOL/backends/BACKEND/{name} on its admin API).",
        )
        _config_option(action)
        action.add_argument("pool", metavar="POOL", help="the pool's name")
        action.add_argument("backend", metavar="BACKEND", help='the backend\'s address, "host:port"')
    listing = commands.add_parser(
        "sessions", help="list the running proxy's sessions",
        description="Print the running proxy's established sessions (GET /sessions on its admin API, every page),"
        " oldest first, as a table: id, client address, identity, route, pool, backend, age, and bytes/messages"
        " each way. Filters match exactly; --peer takes an address with or without its port.",
    )
    _config_option(listing)
    for name, what in (
        ("route", 'route, as the logs name it ("*/chat")'),
        ("pool", "pool"),
        ("backend", 'backend ("host:port")'),
        ("identity", "identity (who authenticated)"),
        ("peer", 'client ("ip" or "ip:port")'),
    ):
        listing.add_argument(f"--{name}", metavar=name.upper(), help=f"only sessions of this {what}")
    listing.add_argument("--json", action="store_true", help='print {"sessions": [...]} as the admin API gives them')
    kick = commands.add_parser(
        "kick", help="close sessions of the running proxy",
        description="Close one session (POST /sessions/ID/close) or every session of an identity (POST"
        " /identities/NAME/close) at a frame boundary: the client gets CODE and TEXT, the backend 1001.",
    )
    _config_option(kick)
    which = kick.add_mutually_exclusive_group(required=True)
    which.add_argument("--session", metavar="ID", help="the session's id (as `wsproxy sessions` and the logs give it)")
    which.add_argument("--identity", metavar="NAME", help="every session of this identity")
    kick.add_argument(
        "--code", type=int, metavar="N",
        help="close code for the client: 1000, 1001, 1008, 1011, 1012, 1013 or 4000-4999 (default 1008)",
    )
    kick.add_argument(
        "--reason", metavar="TEXT", help='close reason, at most 123 bytes of UTF-8 (default "closed by the operator")'
    )
    commands.add_parser(
        "schema", help="print the config's JSON Schema",
        description="Print the JSON Schema (draft 2020-12) of wsproxy.yaml, generated from the config loader,"
        " for editors (e.g. the YAML language server's `# yaml-language-server: $schema=...`).",
    )
    upgrade = commands.add_parser(
        "upgrade", help="start a new generation of processes without dropping sessions (workers > 1)",
        description="Ask the supervisor running FILE (workers > 1) to start a new supervisor and workers from the"
        " installed program on the same listening sockets (POST /upgrade on its admin API, like SIGUSR2), and wait:"
        " exit 0 once the new generation serves; the old workers keep their sessions until they end or"
        " upgrade.timeout. Exit 1 if it did not start (the old generation keeps serving).",
    )
    _config_option(upgrade)
    worker = commands.add_parser("worker")  # started by the supervisor, not by people: not listed
    commands._choices_actions = [a for a in commands._choices_actions if a.dest not in INTERNAL_COMMANDS]
    _config_option(worker)
    worker.add_argument("--ipc-fd", type=int, required=True, help=argparse.SUPPRESS)
    worker.add_argument("--slot", type=int, default=None, help=argparse.SUPPRESS)
    worker.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    return top


def main(argv: list[str] | None = None) -> int:
    command_line = parser()
    try:
        import argcomplete  # type: ignore[import-not-found,unused-ignore]  # optional: the `completion` extra
    except ImportError:
        pass
    else:
        argcomplete.autocomplete(command_line)
    args = command_line.parse_args(argv)
    if args.command is None:
        command_line.print_help()
        return 2
    if args.command == "schema":
        import json

        from .config.json_schema import json_schema

        print(json.dumps(json_schema(), indent=2))
        return 0
    from . import cli

    try:
        if args.command == "reload":
            return cli.reload(args.config, sys.stdout)
        if args.command == "status":
            return cli.status(args.config, sys.stdout, args.json)
        if args.command == "upgrade":
            return cli.upgrade(args.config, sys.stdout)
        if args.command in ("drain", "undrain"):
            return cli.drain(args.config, args.pool, args.backend, args.command == "undrain", sys.stdout)
        if args.command == "sessions":
            filters = {name: getattr(args, name) for name in cli.SESSION_FILTERS if getattr(args, name) is not None}
            return cli.sessions(args.config, sys.stdout, filters, args.json)
        if args.command == "kick":
            return cli.kick(
                args.config, sys.stdout, session=args.session, identity=args.identity, code=args.code, reason=args.reason
            )
    except CommandFailed as exc:
        print(f"wsproxy {args.command}: {exc}", file=sys.stderr)
        return 1
    if args.command == "worker":
        from .supervisor.worker import run as run_worker

        return run_worker(args.config, args.ipc_fd, args.log_level, args.slot)
    return _run_or_check(args)


def _run_or_check(args: argparse.Namespace) -> int:
    from .config.snapshot import ConfigTexts
    from .edge.contexts import load_checked  # no trio: ``wsproxy check`` stays a plain process
    from .errors import ConfigErrors

    texts = ConfigTexts()  # records the YAML files read: the supervisor's workers compose from them
    try:
        config = load_checked(args.config, texts)
    except ConfigErrors as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        print(f"wsproxy: {len(exc.errors)} error(s) in {args.config}", file=sys.stderr)
        return 1
    if args.command == "check":
        if args.dump:
            from .cli import dump

            sys.stdout.write(dump(config))
            return 0
        print(f"wsproxy: {args.config} is valid")
        return 0

    import trio

    from . import app, log, run

    log.configure(args.log_level or config.log.level, config.log.format)
    _log_start(config, args.config)
    import os

    from .supervisor.main import UPGRADE_FD_VARIABLE

    if config.workers > 1 or os.environ.get(UPGRADE_FD_VARIABLE):
        from .supervisor.main import run as supervise

        return supervise(config, args.config, args.log_level, texts.snapshot())
    failed: list[BaseException] = []
    try:
        trio.run(run.main, config, args.config, args.log_level is not None)
    except* app.ListenError as group:
        failed.extend(group.exceptions)
    for failure in failed:
        print(f"wsproxy: {failure}", file=sys.stderr)
    return 1 if failed else 0


def _log_start(config: Config, path: str) -> None:
    """The first line of a run: what runs, from which config, where it will listen."""
    import logging
    import os
    import platform

    from . import __version__
    from ._mypyc import is_compiled
    from .log import log_event
    from .proto import frames

    log_event(
        logging.getLogger("wsproxy.app"), logging.INFO, "starting",
        version=__version__, python=platform.python_version(), pid=os.getpid(), config=os.path.abspath(path),
        listeners=",".join(f"{spec.name}={spec.bind}" for spec in config.listeners),
        admin=str(config.admin.bind) if config.admin is not None else None,
        workers=config.workers, scanner="compiled" if is_compiled(frames) else "pure",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
