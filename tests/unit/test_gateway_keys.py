"""API keys and roles: who a request's headers say the caller is."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from agent.gateway.keys import ApiKey, Keys, Role

APP = ApiKey(name="app", role="user", key="user-key-0123456789")
BOARD = ApiKey(name="board", role="viewer", key="viewer-key-0123456789")


def test_roles_are_ordered_as_on_the_broker() -> None:
    assert Role.VIEWER < Role.USER < Role.OPERATOR < Role.ADMIN
    assert Role.named("Operator") is Role.OPERATOR
    with pytest.raises(ValueError, match="not one of viewer, user, operator, admin"):
        Role.named("root")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Authorization": "Bearer user-key-0123456789"}, ("app", Role.USER)),
        ({"Authorization": "bearer  viewer-key-0123456789 "}, ("board", Role.VIEWER)),
        ({"X-API-Key": "viewer-key-0123456789"}, ("board", Role.VIEWER)),
        ({"Authorization": "Bearer nope-0123456789012"}, None),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
        ({}, None),
    ],
)
def test_a_key_in_either_header_names_its_caller(
    headers: dict[str, str], expected: tuple[str, Role] | None
) -> None:
    caller = Keys([APP, BOARD]).caller(headers)
    assert (None if caller is None else (caller.name, caller.role)) == expected


def test_without_keys_every_caller_is_trusted_as_an_operator() -> None:
    keys = Keys([])
    assert not keys.required
    caller = keys.caller({"Authorization": "Bearer anything"})
    assert caller is not None and (caller.name, caller.role) == ("anonymous", Role.OPERATOR)


def test_a_key_is_never_shown() -> None:
    assert "user-key" not in repr(APP) and "user-key" not in str(APP)


def test_compat_open_read_counts_ipv4_mapped_loopback_as_this_machine() -> None:
    from agent.gateway.server import _loopback

    for remote, local in (
        ("127.0.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.5", False),
        ("::ffff:10.0.0.5", False),
        (None, False),
        ("not-an-address", False),
    ):
        assert _loopback(cast(Any, SimpleNamespace(remote=remote))) is local, remote
