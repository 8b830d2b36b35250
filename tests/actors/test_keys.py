"""SessionKeys: the secret file, the derivation, the reverse lookup."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandboxd.actors.keys import SecretFileError, SessionKeys


def test_the_secret_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    state = tmp_path / "state"
    keys = SessionKeys.of_state_dir(state)
    secret = state / "secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len(secret.read_bytes()) == 32
    # Read again, not remade: the same keys after a restart.
    assert SessionKeys.of_state_dir(state).key_for("sb-1", 1) == keys.key_for("sb-1", 1)
    assert SessionKeys.of_state_dir(tmp_path / "other").key_for("sb-1", 1) != keys.key_for(
        "sb-1", 1
    )
    assert [p.name for p in state.iterdir()] == ["secret"]  # no temporary left behind


def test_concurrent_first_starts_agree_on_one_secret(tmp_path: Path) -> None:
    results: list[str] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        results.append(SessionKeys.of_state_dir(tmp_path).key_for("sb", 1))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]


def test_key_is_urlsafe_base64_of_the_hmac_without_padding() -> None:
    secret = bytes(range(32))
    keys = SessionKeys(secret)
    key = keys.key_for("sandbox-é", 1)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", key)
    digest = hmac.new(secret, "sandbox-é/1".encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(key + "=") == digest
    assert keys.key_for("sandbox-é", 1) == key
    assert keys.key_for("sandbox-e", 1) != key


def test_sandbox_for_knows_remembered_sandboxes_only() -> None:
    keys = SessionKeys(os.urandom(32))
    a, b = keys.key_for("a", 1), keys.key_for("b", 1)
    assert keys.sandbox_for(a) is None  # not remembered yet
    keys.remember("a", 1)
    keys.remember("b", 1)
    assert keys.sandbox_for(a) == "a"
    assert keys.sandbox_for(b) == "b"
    assert keys.sandbox_for("not-a-key") is None
    keys.forget("a")
    keys.forget("never-remembered")
    assert keys.sandbox_for(a) is None
    assert keys.sandbox_for(b) == "b"
    assert keys.key_for("a", 1) == a  # forgetting does not change the key


@given(st.text())
def test_any_string_is_looked_up_without_error_and_finds_nothing_it_is_not(guess: str) -> None:
    keys = SessionKeys(b"k" * 32)
    keys.remember("a", 1)
    assert keys.sandbox_for(guess) == ("a" if guess == keys.key_for("a", 1) else None)


def test_a_recreated_id_gets_a_new_key() -> None:
    keys = SessionKeys(b"s" * 32)
    assert keys.key_for("foo", 1) != keys.key_for("foo", 7)


def test_a_damaged_or_exposed_secret_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"short")
    secret.chmod(0o600)
    with pytest.raises(SecretFileError, match="5 bytes"):
        SessionKeys.of_state_dir(tmp_path)
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o644)
    with pytest.raises(SecretFileError, match="mode 644"):
        SessionKeys.of_state_dir(tmp_path)


def test_repr_does_not_show_the_secret() -> None:
    secret = b"s" * 32
    keys = SessionKeys(secret)
    keys.remember("a", 1)
    assert "sss" not in repr(keys)
    assert keys.key_for("a", 1) not in repr(keys)
