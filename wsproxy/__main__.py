"""The ``wsproxy`` command: parse arguments, set up logging, run. Nothing else.

    wsproxy run -c FILE      serve until SIGTERM or SIGINT
    wsproxy check -c FILE    validate a config: exit 0, or print every error and exit 1
    wsproxy --version
"""

from __future__ import annotations

import argparse
import sys

from . import __version__


class _Version(argparse.Action):
    """``--version``: the version and which frame scanner is in use (imported only when asked)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        from ._mypyc import describe

        print(f"wsproxy {__version__}\n{describe()}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsproxy", description="WebSocket reverse proxy and load balancer")
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and the frame scanner in use")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="serve until SIGTERM or SIGINT")
    run.add_argument("-c", "--config", required=True, metavar="FILE", help="the YAML config file")
    run.add_argument(
        "--log-level", default=None, choices=["debug", "info", "warning", "error"], help="overrides log.level"
    )
    check = commands.add_parser("check", help="validate a config file and exit")
    check.add_argument("-c", "--config", required=True, metavar="FILE", help="the YAML config file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .config.load import load_config
    from .errors import ConfigErrors

    try:
        config = load_config(args.config)
    except ConfigErrors as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        print(f"wsproxy: {len(exc.errors)} error(s) in {args.config}", file=sys.stderr)
        return 1
    if args.command == "check":
        print(f"wsproxy: {args.config} is valid")
        return 0

    import trio

    from . import app, log, run

    log.configure(args.log_level or config.log.level, config.log.format)
    failed: list[BaseException] = []
    try:
        trio.run(run.main, config, args.config, args.log_level is not None)
    except* app.ListenError as group:
        failed.extend(group.exceptions)
    for failure in failed:
        print(f"wsproxy: {failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
