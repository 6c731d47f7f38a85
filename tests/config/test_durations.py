"""Pure tests of ``config.durations``' share-per-time parser (``pools.NAME.rebalance.rate``).

Durations, sizes and addresses are tested through the loader in ``test_load.py``.
"""

from __future__ import annotations

import pytest

from wsproxy.config.durations import parse_fraction_rate


@pytest.mark.parametrize(
    "text, per_s",
    [("1%/min", 0.01 / 60), ("1%/m", 0.01 / 60), ("0.5%/s", 0.005), ("10% / h", 0.1 / 3600), ("100%/s", 1.0)],
)
def test_rate(text: str, per_s: float) -> None:
    assert parse_fraction_rate(text) == pytest.approx(per_s)


@pytest.mark.parametrize("text", ["1/min", "1%", "0%/s", "101%/s", "-1%/s", "1%/d", "abc"])
def test_rate_refused(text: str) -> None:
    with pytest.raises(ValueError, match="1%/min|more than 0"):
        parse_fraction_rate(text)
