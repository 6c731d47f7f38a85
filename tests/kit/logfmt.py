"""Reading the proxy's text log lines back: an independent logfmt parser.

``parse_logfmt(line)`` follows the logfmt convention (go-logfmt's: bare
values end at a space, quoted values take ``\\"``, ``\\\\``, ``\\n``,
``\\r``, ``\\t`` and ``\\uXXXX``, a bare key is a flag) and asserts on
anything else. It is written from that convention, not from
``wsproxy.log``'s own reader, so a formatter and a parser sharing one mistake
cannot agree with each other.

What is not here: JSON lines (``json.loads`` reads them) and waiting for a
line (``tests.kit.wait.wait_for_log``, ``WsproxyProcess.wait_log``).
"""

from __future__ import annotations


def parse_logfmt(line: str) -> dict[str, str | None]:
    """key=value pairs of one logfmt line; a bare ``key`` has the value None (go-logfmt's flag)."""
    pairs: dict[str, str | None] = {}
    i, n = 0, len(line)
    while i < n:
        if line[i] == " ":
            i += 1
            continue
        start = i
        while i < n and line[i] not in " =":
            i += 1
        key = line[start:i]
        assert key and '"' not in key, f"bad key at {start}: {line!r}"
        if i >= n or line[i] == " ":
            pairs[key] = None
            continue
        i += 1  # '='
        if i < n and line[i] == '"':
            i += 1
            out = []
            while True:
                assert i < n, f"unterminated quote: {line!r}"
                c = line[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\":
                    e = line[i + 1]
                    if e == "u":
                        out.append(chr(int(line[i + 2:i + 6], 16)))
                        i += 6
                        continue
                    out.append({"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}[e])
                    i += 2
                    continue
                out.append(c)
                i += 1
            pairs[key] = "".join(out)
            assert i >= n or line[i] == " ", f"junk after a quoted value: {line!r}"
        else:
            start = i
            while i < n and line[i] != " ":
                i += 1
            value = line[start:i]
            assert '"' not in value and "=" not in value, f"a bare value with a quote or '=': {line!r}"
            pairs[key] = value
    return pairs
