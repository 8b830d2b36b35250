"""Who is asking: the bearer token of the websocket handshake, and what its user may see.

Tokens live in memory only as SHA-256 digests, so a heap dump or a log of the
config object does not give one away. With no ``[[users]]`` configured the
daemon has one embedded admin whose token it keeps in STATE_DIR/admin.token.
"""

import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs

import attrs

RESOURCE = "/v1"
ADMIN_TOKEN_FILE = "admin.token"


@attrs.frozen
class User:
    id: str | None  # None: the embedded admin of a daemon without [[users]]
    admin: bool


EMBEDDED_ADMIN = User(None, admin=True)


class ConfiguredUser(Protocol):
    """A ``[[users]]`` entry; config.py has already turned a plain token into its digest."""

    @property
    def id(self) -> str: ...

    @property
    def admin(self) -> bool: ...

    @property
    def token_sha256(self) -> str: ...


def _digest(token: str) -> bytes:
    # surrogatepass: any str a handshake yields hashes instead of raising.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class Authenticator:
    """Maps a bearer token to its user."""

    def __init__(self, users: Iterable[ConfiguredUser]) -> None:
        self._users: list[tuple[bytes, User]] = []
        for user in users:
            try:
                digest = bytes.fromhex(user.token_sha256)
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ValueError(f"user {user.id!r}: token_sha256 must be 64 hex digits")
            if any(digest == known for known, _ in self._users):
                raise ValueError(f"user {user.id!r} has the same token as another user")
            self._users.append((digest, User(user.id, user.admin)))

    @classmethod
    def embedded_admin(cls, token: str) -> "Authenticator":
        """The daemon without ``[[users]]``: one admin, whose token is ``token``."""
        authenticator = cls(())
        authenticator._users.append((_digest(token), EMBEDDED_ADMIN))
        return authenticator

    def authenticate(self, token: str | None) -> User | None:
        if not token:
            return None
        candidate = _digest(token)
        found = None
        for digest, user in self._users:
            # Every entry is compared, in constant time, with no early exit: how
            # long this takes says nothing about which user, if any, matched.
            if hmac.compare_digest(digest, candidate):
                found = user
        return found


Headers = (
    Mapping[str, str]
    | Mapping[bytes, bytes]
    | Iterable[tuple[str, str]]
    | Iterable[tuple[bytes, bytes]]
)


def _text(value: str | bytes) -> str:
    # surrogateescape keeps distinct bytes distinct: no two headers decode alike.
    return value if isinstance(value, str) else value.decode("utf-8", "surrogateescape")


def token_from_handshake(path: str, headers: Headers) -> str | None:
    """The bearer token of a handshake: the Authorization header, else ``?token=``.

    ``path`` is the request target (``/v1?token=...``); ``headers`` are pairs,
    as trio-websocket and wsproto give them, or a mapping.
    """
    pairs: Iterable[tuple[str | bytes, str | bytes]] = (
        headers.items() if isinstance(headers, Mapping) else headers
    )
    for name, value in pairs:
        if _text(name).strip().lower() == "authorization":
            parts = _text(value).split(None, 1)
            if len(parts) == 2 and parts[0].lower() == "bearer":
                return parts[1].strip()
    # Browsers cannot set headers on a websocket, hence the query parameter.
    tokens = parse_qs(path.partition("?")[2]).get("token")
    return tokens[0] if tokens else None


def check_path(path: str) -> bool:
    """Whether the request target names the protocol's one resource (a query is allowed)."""
    return path.partition("?")[0] == RESOURCE


def ensure_admin_token(state_dir: Path) -> str:
    """The embedded admin's token: read from STATE_DIR/admin.token, made there on first start."""
    path = state_dir / ADMIN_TOKEN_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _read_token(path)
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    # mkstemp opens with O_EXCL and mode 0600: the token is never readable by
    # others, not even for a moment. It is written whole before it gets its name.
    fd, temporary = tempfile.mkstemp(dir=state_dir, prefix=f".{ADMIN_TOKEN_FILE}.")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(token + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            # link, unlike rename, never replaces: of two daemons starting at
            # once, the second reads the token of the first.
            os.link(temporary, path)
        except FileExistsError:
            return _read_token(path)
    finally:
        os.unlink(temporary)
    directory = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return token


def _read_token(path: Path) -> str:
    with path.open() as file:
        if os.fstat(file.fileno()).st_mode & 0o077:
            # Someone widened it; the contract says 0600.
            os.fchmod(file.fileno(), 0o600)
        token = file.read().strip()
    if not token:
        raise ValueError(f"{path} is empty; delete it and a new admin token is made on start")
    return token
