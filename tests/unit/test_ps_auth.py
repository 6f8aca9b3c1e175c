"""The shard's bearer-token interceptor, in process (no server)."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from recps.ps.server import AuthInterceptor

OK = object()


def _call(icpt: AuthInterceptor, method: str, md: tuple[tuple[str, Any], ...] | None) -> Any:
    details = SimpleNamespace(method=method, invocation_metadata=md)
    return icpt.intercept_service(lambda d: OK, details)


@pytest.mark.parametrize(
    ("md", "allowed"),
    [
        ((("authorization", "Bearer tok3n"),), True),
        ((("authorization", "Bearer tok3N"),), False),
        ((("authorization", "Bearer tok3"),), False),  # a prefix of the token
        ((("authorization", "Bearer tok3n "),), False),
        ((("authorization", "tok3n"),), False),
        ((("x-other", "Bearer tok3n"),), False),
        (None, False),
    ],
)
def test_token_check(md: tuple[tuple[str, Any], ...] | None, allowed: bool) -> None:
    icpt = AuthInterceptor("tok3n")
    got = _call(icpt, "/recps.ps.v1.ParameterServer/Lookup", md)
    assert (got is OK) is allowed


def test_health_and_reflection_are_exempt() -> None:
    icpt = AuthInterceptor("tok3n")
    assert _call(icpt, "/grpc.health.v1.Health/Check", None) is OK
    assert _call(icpt, "/grpc.reflection.v1alpha.ServerReflection/Info", None) is OK


def test_token_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain == returns as soon as a byte differs, leaking the matching prefix's length
    through timing; the check must go through hmac.compare_digest."""
    seen: list[tuple[bytes, bytes]] = []
    real: Callable[[Any, Any], bool] = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr("recps.ps.server.hmac.compare_digest", spy)
    icpt = AuthInterceptor("tok3n")
    assert _call(icpt, "/x/Y", (("authorization", "Bearer wrong"),)) is not OK
    assert _call(icpt, "/x/Y", (("authorization", "Bearer tok3n"),)) is OK
    assert len(seen) == 2
