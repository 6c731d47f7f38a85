"""Fuzz target: the relay's frame scanner (wsproxy/proto/frames.py ``FrameScanner``).

Input layout (``fuzz/make_seeds.py`` writes seeds in it)::

    flags        bit 0 from_client, bit 1 permessage-deflate (rsv_allowed=RSV1),
                 bit 2 an unknown extension (rsv_allowed=RSV_ALL, when bit 1 is clear),
                 bit 3 a max_message_bytes follows, bit 4 a swallowed ping payload follows
    [u16]        max_message_bytes (bit 3; 0 = unlimited)
    [len, bytes] the payload of the proxy's outstanding ping (bit 4; at most 125 bytes)
    count        number of split points (0..7), then one u16 per split point
    stream       the bytes of one direction of a WebSocket connection

Invariants checked:

- ``feed`` never raises.
- Fed whole and fed in pieces (at the chosen split points) the scanner
  forwards the same bytes, ends with the same violation and the same state.
- What is forwarded, plus the one pong cut out (only when it answers the
  proxy's ping, byte for byte), is a prefix of the input: nothing is
  reordered, invented or dropped otherwise.
- A reference model written here from RFC 6455 §5 (structure only: masking,
  RSV bits, opcodes, control frame rules, fragmentation, the 64-bit length,
  max_message_bytes) agrees: a frame the model refuses is refused, at or
  before its first byte, with one of the close codes the broken rules call
  for; without a violation, everything up to the held tail (an incomplete
  header or control frame) is forwarded. The scanner may refuse more than
  the model (payload checks such as UTF-8, 1007, or close codes, 1002), but
  only with those codes.

Not covered: ``stop_at_boundary`` (the relay's drain) and the relay itself.
"""

from __future__ import annotations

import sys

from fuzz._harness import Reader, finding, fuzz_main, instrumented

with instrumented("wsproxy"):
    from wsproxy.proto.frames import RSV1, RSV_ALL, FrameScanner, Violation

PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
TOO_BIG = 1009


class Case:
    """One decoded fuzz input."""

    __slots__ = ("from_client", "deflate", "rsv_allowed", "max_message_bytes", "ping", "splits", "stream")

    def __init__(self, data: bytes) -> None:
        r = Reader(data)
        flags = r.byte()
        self.from_client = bool(flags & 1)
        self.deflate = bool(flags & 2)
        self.rsv_allowed = RSV1 if self.deflate else (RSV_ALL if flags & 4 else 0)
        self.max_message_bytes = r.u16() if flags & 8 else 0
        self.ping: bytes | None = r.take(r.byte() % 126) if flags & 16 else None
        splits = [r.u16() for _ in range(r.byte() % 8)]
        self.stream = r.rest()
        self.splits = sorted({s % (len(self.stream) + 1) for s in splits})

    def scanner(self) -> FrameScanner:
        scanner = FrameScanner(
            from_client=self.from_client,
            rsv_allowed=self.rsv_allowed,
            deflate=self.deflate,
            max_message_bytes=self.max_message_bytes,
        )
        scanner.swallow_pong = self.ping
        return scanner


def _state(s: FrameScanner) -> tuple[object, ...]:
    return (s.violation, s.remaining, s.in_message, s.message_bytes, s.messages, s.close_code,
            s.close_seen, s.swallow_pong, s.pongs_swallowed)


class Model:
    """RFC 6455 §5 over a whole buffer, frame by frame, written independently of the scanner.

    ``forwarded``: how many input bytes may go out; ``codes``: the close codes a
    refusal at ``forwarded`` may carry (empty: no violation); ``cut``: the
    (start, end) of the one pong that answers the proxy's ping; ``text_tail``:
    the input ends inside a text message's payload.
    """

    def __init__(self, case: Case) -> None:
        self.forwarded = 0
        self.codes: set[int] = set()
        self.cut: tuple[int, int] | None = None
        self.text_tail = False
        self._run(case)

    def _run(self, case: Case) -> None:
        data, n = case.stream, len(case.stream)
        ping = case.ping
        fragmented: int | None = None  # opcode of the message in progress
        message_bytes = 0
        pos = 0
        while pos < n:
            self.forwarded = pos
            if n - pos < 2:
                return  # incomplete header: held
            b0, b1 = data[pos], data[pos + 1]
            fin, rsv, opcode = b0 & 0x80, b0 & 0x70, b0 & 0x0F
            masked, length = b1 & 0x80, b1 & 0x7F
            size_bytes = {126: 2, 127: 8}.get(length, 0)
            header = 2 + size_bytes + (4 if masked else 0)
            if n - pos < header:
                return
            if size_bytes:
                length = int.from_bytes(data[pos + 2 : pos + 2 + size_bytes], "big")
            codes = set()
            if size_bytes == 8 and length >> 63:
                codes.add(PROTOCOL_ERROR)  # §5.2: the most significant bit MUST be 0
            if bool(masked) != case.from_client:
                codes.add(PROTOCOL_ERROR)  # §5.1
            control = opcode >= 8
            if opcode not in (0, 1, 2, 8, 9, 10):
                codes.add(PROTOCOL_ERROR)  # §5.2 reserved opcodes
            if rsv & ~case.rsv_allowed:
                codes.add(PROTOCOL_ERROR)  # §5.2 RSV bits without an extension
            if control:
                if rsv and case.deflate:
                    codes.add(PROTOCOL_ERROR)  # RFC 7692 §6.1: only data messages are compressed
                if not fin or length > 125:
                    codes.add(PROTOCOL_ERROR)  # §5.5
            elif opcode in (0, 1, 2):
                if opcode == 0:
                    if fragmented is None:
                        codes.add(PROTOCOL_ERROR)  # §5.4
                    if rsv & RSV1 and case.deflate:
                        codes.add(PROTOCOL_ERROR)  # RFC 7692 §6.1: RSV1 on the first frame only
                    size = message_bytes + length
                else:
                    if fragmented is not None:
                        codes.add(PROTOCOL_ERROR)  # §5.4
                    size = length
                if case.max_message_bytes and size > case.max_message_bytes:
                    codes.add(TOO_BIG)
            if codes:
                self.codes = codes
                return
            end = pos + header + length
            if control:
                if end > n:
                    return  # incomplete control frame: held
                if opcode == 8 and length == 1:
                    self.codes = {PROTOCOL_ERROR}  # §5.5.1, seen once the frame is whole
                    return
                if opcode == 10 and ping is not None and self.cut is None and length == len(ping):
                    payload = data[pos + header : end]
                    if masked:
                        key = data[pos + header - 4 : pos + header]
                        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
                    if payload == ping:
                        self.cut = (pos, end)
                pos = end
                continue
            if opcode != 0:
                fragmented = opcode
            kind = fragmented
            if fin:
                fragmented, message_bytes = None, 0
            else:
                message_bytes = size
            if end > n:
                self.forwarded = n
                self.text_tail = kind == 1
                return
            pos = end
        self.forwarded = n


def test_one_input(data: bytes) -> None:
    case = Case(data)
    stream = case.stream

    whole = case.scanner()
    out_whole = whole.feed(stream)

    pieces = case.scanner()
    out_parts = []
    start = 0
    for split in [*case.splits, len(stream)]:
        out_parts.append(pieces.feed(stream[start:split]))
        start = split
    out_pieces = b"".join(out_parts)

    late_utf8 = (
        whole.violation is not None
        and whole.violation.close_code == 1007
        and pieces.violation == whole.violation
        and out_pieces.startswith(out_whole)
        and pieces.pongs_swallowed == whole.pongs_swallowed
    )
    # Invalid UTF-8 is found where its byte arrives: fed whole, before the frame holding it;
    # fed in pieces, possibly inside that frame, after its valid start (frames.py's docstring).
    if not late_utf8 and (out_whole != out_pieces or _state(whole) != _state(pieces)):
        finding(
            "frames-split",
            f"fed whole vs in pieces at {case.splits}: {len(out_whole)} vs {len(out_pieces)} bytes, "
            f"{_state(whole)} vs {_state(pieces)}",
        )

    model = Model(case)
    # The forwarded bytes, with the cut pong put back, must be a prefix of the input.
    if whole.pongs_swallowed:
        if model.cut is None or whole.pongs_swallowed != 1:
            finding("frames-pong", f"{whole.pongs_swallowed} pong(s) cut, model expected {model.cut}")
            return
        a, b = model.cut
        consumed = len(out_whole) + (b - a)
        if len(out_whole) < a or out_whole != stream[:a] + stream[b:consumed]:
            finding("frames-prefix", f"output is not the input minus the pong at {model.cut}")
    else:
        consumed = len(out_whole)
        if model.cut is not None and model.cut[1] <= consumed:
            finding("frames-pong", f"the answer to the proxy's ping at {model.cut} was forwarded")
        if stream[:consumed] != out_whole:
            finding("frames-prefix", f"output of {consumed} bytes is not a prefix of the input")

    violation = whole.violation
    if violation is not None and not isinstance(violation, Violation):
        finding("frames-type", f"violation of type {type(violation).__name__}")
    if model.codes:
        if violation is None:
            finding("frames-missed", f"model refuses the frame at {model.forwarded} ({model.codes}), scanner does not")
        elif consumed > model.forwarded:
            finding("frames-late", f"refused after forwarding {consumed} bytes; the bad frame starts at {model.forwarded}")
        elif consumed == model.forwarded and violation.close_code not in model.codes | {INVALID_DATA, PROTOCOL_ERROR}:
            finding("frames-code", f"close code {violation.close_code} where {model.codes} apply: {violation.reason}")
        elif consumed < model.forwarded and violation.close_code not in (INVALID_DATA, PROTOCOL_ERROR):
            finding("frames-extra", f"refused with {violation.close_code} at {consumed}: {violation.reason}")
    elif violation is not None:
        if consumed > model.forwarded:
            finding("frames-late", f"refused after {consumed} bytes, beyond the model's {model.forwarded}")
        if violation.close_code not in (INVALID_DATA, PROTOCOL_ERROR):
            finding("frames-extra", f"refused with {violation.close_code} where the model sees no violation: "
                                    f"{violation.reason}")
    else:
        # Everything but the held tail goes out; a payload check may hold back the
        # last bytes of an incomplete UTF-8 sequence at the end of a text payload.
        short = model.forwarded - consumed
        if not (short == 0 or (model.text_tail and 0 < short <= 3)):
            finding("frames-held", f"forwarded {consumed} of the {model.forwarded} bytes the model forwards")


def main() -> None:
    fuzz_main(test_one_input)


if __name__ == "__main__":
    sys.exit(main())
