"""The sweeper's period when sessions have deadlines (control.sweeper + control.lifetime): pure."""

from __future__ import annotations

import dataclasses

from wsproxy.config.schema import AuthConfig, ForwardAuthConfig, JwtConfig, PoolName, RouteConfig
from wsproxy.control.sweeper import LIFETIME_PERIOD_S, MAX_PERIOD_S, MIN_PERIOD_S, sweep_period_s
from tests.support import make_config


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
