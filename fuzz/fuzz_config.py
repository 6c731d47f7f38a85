"""Fuzz target: the config loader (wsproxy/config/load.py ``load_config``).

Input: the bytes of a YAML file. It is written to one file in a temporary
directory created once per process (next to a cookie secret and a tokens file
that relative names in the seeds point at), and loaded from there, as
``wsproxy check`` and a reload do.

Invariants:

- the loader returns a ``Config`` or raises ``ConfigErrors``, nothing else
  (no YAML, Unicode, type, recursion or attribute error escapes);
- every error names the file and is located: line and column from 1 (0:0
  only for a problem of the whole file, "cannot read ..."), within the text;
- errors come sorted by position, and ``str()`` of each starts with
  ``FILE:LINE:COL: `` (or ``FILE: `` without a position);
- no message quotes the content of a file the config names (the secrets
  written next to the config carry a marker that must never appear).

Not covered: reading named files that are devices, FIFOs or huge (issue 15,
item 10); the inputs stay inside the temporary directory's small files.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

from fuzz._harness import finding, fuzz_main, instrumented

with instrumented("wsproxy", "yaml"):
    from wsproxy.config.load import load_config
    from wsproxy.config.schema import Config
    from wsproxy.errors import ConfigErrors

#: Written where secrets go in the files next to the config; no error message may contain them.
MARKER = "FUZZ-SECRET-7d1c"
DIGEST = "7d1cfa22" * 8  # a token's SHA-256 in the tokens file (errors never echo a digest field)

_DIR = tempfile.mkdtemp(prefix="wsproxy-fuzz-config-")
atexit.register(shutil.rmtree, _DIR, True)
PATH = os.path.join(_DIR, "wsproxy.yaml")
with open(os.path.join(_DIR, "demo-cookie.key"), "w") as _f:
    _f.write(f"{MARKER}-cookie-secret-0123456789abcdef0123456789abcdef\n")
with open(os.path.join(_DIR, "tokens"), "w") as _f:
    _f.write(f"ci-bot {DIGEST}\n")


def test_one_input(data: bytes) -> None:
    with open(PATH, "wb") as file:
        file.write(data)
    try:
        config = load_config(PATH)
    except ConfigErrors as exc:
        errors = exc.errors
    else:
        if not isinstance(config, Config):
            finding("config-type", f"load_config returned {type(config).__name__}")
        return
    if not errors:
        finding("config-empty", "ConfigErrors without an error")
    # Lines as YAML counts them (§5.4: CR LF, CR, LF, and in YAML 1.1 NEL, LS, PS too).
    text_in = data.decode("utf-8", "replace").replace("\r\n", "\n")
    lines = sum(text_in.count(c) for c in "\r\n\x85\u2028\u2029") + 1
    positions = []
    for error in errors:
        text = str(error)
        if error.file != PATH:
            finding("config-file", f"error names {error.file!r}: {text}")
        if error.line == 0 and error.column == 0:
            if not error.message.startswith("cannot read"):
                finding("config-unlocated", f"an error without a position: {text}")
            expected = f"{PATH}: "
        else:
            if not (1 <= error.line <= lines and error.column >= 1):
                finding("config-position", f"position {error.line}:{error.column} outside {lines} lines: {text}")
            expected = f"{PATH}:{error.line}:{error.column}: "
        if not text.startswith(expected):
            finding("config-format", f"{text!r} does not start with {expected!r}")
        if MARKER in text or DIGEST in text:
            finding("config-secret", f"an error quotes a named file's content: {text}")
        positions.append((error.line, error.column))
    if positions != sorted(positions):
        finding("config-order", f"errors not sorted by position: {positions}")


def main() -> None:
    fuzz_main(test_one_input)


if __name__ == "__main__":
    sys.exit(main())
