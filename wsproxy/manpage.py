"""``python -m wsproxy.manpage``: write ``man/wsproxy.1`` from the argparse parser of ``wsproxy``.

The man page is generated, never edited: the commands, options and help texts
come from ``wsproxy.__main__.parser()``, so the page and ``--help`` cannot
disagree. ``tests/e2e/test_cli_ops.py`` checks that the committed page is
what this writes. No I/O but the one file (or stdout with ``-``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .__main__ import INTERNAL_COMMANDS, parser

PAGE = Path(__file__).resolve().parents[1] / "man" / "wsproxy.1"


def _roff(text: str) -> str:
    """Escape text for roff: backslashes, and a leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines())


def _options(sub: argparse.ArgumentParser) -> list[str]:
    lines = []
    for action in sub._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            name = ", ".join(f"\\fB{_roff(o)}\\fR" for o in action.option_strings)
            if action.nargs != 0:
                name += f" \\fI{action.metavar or action.dest.upper()}\\fR"
        else:
            name = f"\\fI{action.metavar or action.dest}\\fR"
        lines += [".TP", name, _roff(action.help or "")]
    return lines


def render() -> str:
    top = parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    lines = [
        f'.TH WSPROXY 1 "" "wsproxy {__version__}" "User Commands"',
        ".SH NAME",
        "wsproxy \\- " + _roff(top.description or ""),
        ".SH SYNOPSIS",
    ]
    for name, sub in subs.choices.items():
        if name in INTERNAL_COMMANDS:
            continue
        usage = sub.format_usage().removeprefix("usage: ").strip()
        lines += [".br", _roff(" ".join(usage.split()))]
    lines += [".br", "wsproxy \\-\\-version", ".SH COMMANDS"]
    for name, sub in subs.choices.items():
        if name in INTERNAL_COMMANDS:
            continue
        lines += [".SS " + name, _roff(sub.description or "").replace("\n\n", "\n.PP\n")]
        if name == "run":
            lines[-1] = ".nf\n" + lines[-1] + "\n.fi"
        lines += _options(sub)
    lines += [".SH FILES", ".TP", "/etc/wsproxy/wsproxy.yaml", "the config file when \\fB\\-c\\fR is not given",
              ".SH EXIT STATUS", _roff(top.epilog or "").replace("\n", " "),
              ".SH SEE ALSO", "README.md and conf/wsproxy.yaml (every key, its default and meaning)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[:1] == ["-"]:
        sys.stdout.write(text)
    else:
        PAGE.parent.mkdir(exist_ok=True)
        PAGE.write_text(text)
        print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
