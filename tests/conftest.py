"""Shared fixtures: a real Mosquitto started from the project's own test config,
and a fresh topic prefix per test so retained messages never leak between tests."""

from __future__ import annotations

import itertools
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.brokers import MosquittoBroker, mosquitto_binary

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIG = REPO_ROOT / "mosquitto" / "test.conf"
SHIPPED_ACL = REPO_ROOT / "mosquitto" / "acl"
# Accounts on the broker's password-protected listener, one per role of the shipped ACL.
TEST_USERS = {
    "gpu1": "agent-secret",
    "operator": "operator-secret",
    "viewer": "viewer-secret",
    "admin": "admin-secret",
}

_prefix_counter = itertools.count()


def _password_file(users: dict[str, str]) -> bytes:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "passwd"
        path.touch()
        for user, password in users.items():
            subprocess.run(["mosquitto_passwd", "-b", str(path), user, password], check=True)
        return path.read_bytes()


def make_broker() -> MosquittoBroker:
    """A broker from mosquitto/test.conf: an anonymous listener and a listener with
    the shipped ACL. Its files live in a directory of its own that the broker, after
    dropping root, can read (pytest's tmp_path is 0700)."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (bash .ci/run installs it)")
    return MosquittoBroker(
        TEST_CONFIG.read_text(),
        files={"passwd": _password_file(TEST_USERS), "acl": SHIPPED_ACL.read_text()},
    )


@pytest.fixture(scope="session")
def broker() -> Iterator[MosquittoBroker]:
    """One broker for the whole session (tests isolate by prefix)."""
    with make_broker() as instance:
        yield instance


@pytest.fixture
def own_broker() -> Iterator[MosquittoBroker]:
    """A broker of the test's own, for tests that stop and restart it."""
    with make_broker() as instance:
        yield instance


@pytest.fixture
def prefix() -> str:
    return f"t{os.getpid()}x{next(_prefix_counter)}/modelbus"
