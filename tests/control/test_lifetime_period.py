"""The sweeper's period, from idle timeouts, keepalives and session deadlines (control.sweeper + control.lifetime): pure."""

from __future__ import annotations

import dataclasses

from wsproxy.config.schema import AuthConfig, ForwardAuthConfig, JwtConfig, KeepaliveConfig, PoolName, RouteConfig, TimeoutsConfig
from wsproxy.control.sweeper import LIFETIME_PERIOD_S, MAX_PERIOD_S, MIN_PERIOD_S, sweep_period_s
from tests.kit.servers import make_config


def with_route(**changes: object) -> float:
    config = make_config([9001])
    return sweep_period_s(dataclasses.replace(config, routes=(RouteConfig(pool=PoolName("main"), **changes),)))  # type: ignore[arg-type]


def test_period_follows_the_deadlines() -> None:
    assert with_route() == MAX_PERIOD_S
    assert with_route(max_session_age_s=10.0) == 0.2  # within 2 % of the age
    assert with_route(max_session_age_s=7200.0) == MAX_PERIOD_S
    assert with_route(max_session_age_s=0.1) == MIN_PERIOD_S
    jwt = JwtConfig(algorithms=("HS256",))
    assert with_route(auth=AuthConfig(mode="jwt", jwt=jwt)) == MAX_PERIOD_S
    assert with_route(auth=AuthConfig(mode="jwt", jwt=jwt, enforce_expiry=True)) == LIFETIME_PERIOD_S
    forward = ForwardAuthConfig(url="http://127.0.0.1:1/", lifetime_from="X-Session-Lifetime")
    assert with_route(auth=AuthConfig(mode="forward", forward=forward)) == LIFETIME_PERIOD_S


def test_sweep_period_follows_idle_and_keepalive_within_bounds() -> None:
    config = make_config([], timeouts=TimeoutsConfig(idle_s=80.0))
    assert sweep_period_s(config) == MAX_PERIOD_S  # 80 / 8 = 10 s, capped
    assert sweep_period_s(dataclasses.replace(config, timeouts=TimeoutsConfig(idle_s=8.0))) == 1.0
    fast = RouteConfig(pool=PoolName("main"), keepalive=KeepaliveConfig(interval_s=0.4, timeout_s=2.0))
    assert sweep_period_s(dataclasses.replace(config, routes=(fast,))) == 0.1
    tiny = RouteConfig(pool=PoolName("main"), keepalive=KeepaliveConfig(interval_s=0.001, timeout_s=0.001))
    assert sweep_period_s(dataclasses.replace(config, routes=(tiny,))) == MIN_PERIOD_S
