"""Tokens from the handshake, users from tokens, and the embedded admin's token file."""

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandboxd.config import UserConfig
from sandboxd.gateway.auth import (
    EMBEDDED_ADMIN,
    Authenticator,
    Headers,
    User,
    check_path,
    ensure_admin_token,
    token_from_handshake,
)

ALICE_TOKEN = "alice-secret-token"
ROOT_TOKEN = "root-secret-token-é"


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@attrs.frozen
class Configured:
    id: str
    token_sha256: str
    admin: bool = False


@pytest.fixture
def authenticator() -> Authenticator:
    return Authenticator(
        [
            Configured("alice", sha256(ALICE_TOKEN)),
            Configured("root", sha256(ROOT_TOKEN).upper(), admin=True),
        ]
    )


# --- Authenticator.


def test_a_known_token_gives_its_user(authenticator: Authenticator) -> None:
    assert authenticator.authenticate(ALICE_TOKEN) == User("alice", admin=False)
    assert authenticator.authenticate(ROOT_TOKEN) == User("root", admin=True)


@pytest.mark.parametrize("token", [None, "", "alice", ALICE_TOKEN + " ", ALICE_TOKEN.upper()])
def test_a_missing_or_wrong_token_gives_no_user(
    authenticator: Authenticator, token: str | None
) -> None:
    assert authenticator.authenticate(token) is None


@given(st.text(max_size=30) | st.text(st.characters(categories=["Cs"]), min_size=1))
def test_any_candidate_token_is_answered(token: str) -> None:
    authenticator = Authenticator([Configured("alice", sha256(ALICE_TOKEN))])
    expected = User("alice", admin=False) if token == ALICE_TOKEN else None
    assert authenticator.authenticate(token) == expected


def test_only_digests_are_kept(authenticator: Authenticator) -> None:
    assert ALICE_TOKEN not in repr(vars(authenticator))


def test_the_config_s_users_are_accepted() -> None:
    user = UserConfig(id="bob", token_sha256=sha256("bob-secret-token"), admin=False)
    assert Authenticator([user]).authenticate("bob-secret-token") == User("bob", admin=False)


@pytest.mark.parametrize("digest", ["", "abc", "zz" * 32, sha256("x")[:-1]])
def test_a_malformed_digest_is_refused(digest: str) -> None:
    with pytest.raises(ValueError, match="'alice'"):
        Authenticator([Configured("alice", digest)])


def test_two_users_with_one_token_are_refused() -> None:
    with pytest.raises(ValueError, match="'bob'"):
        Authenticator([Configured("alice", sha256("t")), Configured("bob", sha256("t").upper())])


def test_the_embedded_admin() -> None:
    authenticator = Authenticator.embedded_admin("the-token")
    assert authenticator.authenticate("the-token") == EMBEDDED_ADMIN == User(None, admin=True)
    assert authenticator.authenticate("other") is None


# --- The handshake.


@pytest.mark.parametrize(
    ("path", "headers", "token"),
    [
        ("/v1", [(b"authorization", b"Bearer abc")], "abc"),
        ("/v1", [(b"Authorization", b"bearer  abc ")], "abc"),
        ("/v1", [(b"AUTHORIZATION", b"BEARER abc")], "abc"),
        ("/v1", [(b"host", b"x"), (b"authorization", b"Bearer a.b-c_d")], "a.b-c_d"),
        ("/v1", {"Authorization": "Bearer abc"}, "abc"),
        ("/v1", {b"authorization": b"Bearer abc"}, "abc"),
        ("/v1?token=abc", [], "abc"),
        ("/v1?x=1&token=a%2Bb%20c", [], "a+b c"),
        ("/v1?token=query", [(b"authorization", b"Bearer header")], "header"),
        ("/v1?token=query", [(b"authorization", b"Basic dXNlcg==")], "query"),
        ("/v1", [(b"authorization", b"Basic dXNlcg==")], None),
        ("/v1", [(b"authorization", b"Bearer")], None),
        ("/v1", [(b"authorization", b"Bearer   ")], None),
        ("/v1", [(b"authorization", b"")], None),
        ("/v1?token=", [], None),
        ("/v1?tokens=abc", [], None),
        ("/v1", [], None),
    ],
)
def test_token_from_handshake(path: str, headers: Headers, token: str | None) -> None:
    assert token_from_handshake(path, headers) == token


@given(st.text(max_size=30), st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=20))))
def test_any_handshake_is_answered(path: str, headers: list[tuple[bytes, bytes]]) -> None:
    token = token_from_handshake(path, headers)
    assert token is None or isinstance(token, str)
    Authenticator.embedded_admin("t").authenticate(token)


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/v1", True),
        ("/v1?token=x", True),
        ("/v1?", True),
        ("/v1/", False),
        ("/v2", False),
        ("/", False),
        ("/v1x", False),
        ("v1", False),
        ("", False),
    ],
)
def test_check_path(path: str, ok: bool) -> None:
    assert check_path(path) is ok


# --- The embedded admin's token file.


@pytest.fixture
def no_umask() -> Iterator[None]:
    # The file must be 0600 by how it is made, not thanks to the umask.
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_the_admin_token_is_made_0600_and_stays_the_same(tmp_path: Path, no_umask: None) -> None:
    state_dir = tmp_path / "state"
    token = ensure_admin_token(state_dir)
    path = state_dir / "admin.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == token + "\n"
    assert len(token) >= 32
    assert ensure_admin_token(state_dir) == token
    assert os.listdir(state_dir) == ["admin.token"]  # no temporary file left behind
    assert ensure_admin_token(tmp_path / "elsewhere") != token


def test_an_edited_token_file_is_read_and_its_mode_tightened(tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    path.write_text("  chosen-by-hand \n")
    path.chmod(0o644)
    assert ensure_admin_token(tmp_path) == "chosen-by-hand"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_empty_token_file_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text("\n")
    with pytest.raises(ValueError, match=r"admin\.token"):
        ensure_admin_token(tmp_path)


def test_of_two_daemons_starting_at_once_the_first_token_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = os.link

    def other_daemon_first(source: str, target: Path) -> None:
        target.write_text("the-other-daemon-s\n")
        link(source, target)

    monkeypatch.setattr(os, "link", other_daemon_first)
    assert ensure_admin_token(tmp_path) == "the-other-daemon-s"
    assert os.listdir(tmp_path) == ["admin.token"]
