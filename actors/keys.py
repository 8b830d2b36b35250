"""Session API keys: one per sandbox, derived from a per-daemon secret.

A key is HMAC-SHA256(secret, sandbox id): nothing to store, and the same key
again after a restart, so keys never go into the log (which must not hold
secrets) yet survive the daemon. The secret lives in ``STATE_DIR/secret``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

SECRET_FILE = "secret"
SECRET_BYTES = 32


class SecretFileError(Exception):
    """The secret file exists but cannot be used (wrong size, readable by others)."""


class SessionKeys:
    """Derives sandboxes' session keys, and finds the sandbox a key belongs to."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        #: SHA-256 of each live sandbox's key -> its id: what a key is looked up by.
        self._by_digest: dict[bytes, str] = {}
        self._by_id: dict[str, str] = {}

    @classmethod
    def of_state_dir(cls, state_dir: str | os.PathLike[str]) -> SessionKeys:
        """The keys under ``STATE_DIR/secret``, created (mode 0600) on first use."""
        return cls(load_or_create_secret(Path(state_dir) / SECRET_FILE))

    def __repr__(self) -> str:
        return f"<SessionKeys: {len(self._by_id)} sandboxes>"  # never the secret

    def key_for(self, sandbox_id: str, created_seq: int) -> str:
        """The session key of a sandbox: URL-safe base64 of the HMAC, no padding (43 chars).

        The seq of its ``sandbox.created`` event is part of the message: ids are
        client-chosen, and a sandbox created again under a deleted one's id must not
        get the old key, which its previous owner may still hold.
        """
        message = f"{sandbox_id}/{created_seq}".encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def remember(self, sandbox_id: str, created_seq: int) -> None:
        """Make ``sandbox_for`` know this sandbox's key (on start and on recovery)."""
        key = self.key_for(sandbox_id, created_seq)
        self._by_digest[_digest(key)] = sandbox_id
        self._by_id[sandbox_id] = key

    def forget(self, sandbox_id: str) -> None:
        """Stop answering for a deleted sandbox's key."""
        key = self._by_id.pop(sandbox_id, None)
        if key is not None:
            self._by_digest.pop(_digest(key), None)

    def sandbox_for(self, key: str) -> str | None:
        """The live sandbox this key belongs to, or None: O(1), compared in constant time.

        One dict lookup, by the SHA-256 of ``key``, not a comparison against every
        key: what the lookup hashes and compares is a digest, which tells nothing
        about how much of a guess was right, and the key the lookup found is then
        compared with ``key`` by ``hmac.compare_digest``, whose time does not
        depend on where they differ.
        """
        sandbox_id = self._by_digest.get(_digest(key))
        if sandbox_id is None:
            return None
        if not hmac.compare_digest(
            self._by_id[sandbox_id].encode(), key.encode("utf-8", "surrogatepass")
        ):
            return None  # a SHA-256 collision: never in practice, refused all the same
        return sandbox_id


def _bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")  # any str a caller may hold: never raises


def _digest(key: str) -> bytes:
    return hashlib.sha256(_bytes(key)).digest()


def load_or_create_secret(path: Path) -> bytes:
    """The secret at ``path``; made first if absent, atomically and never clobbering.

    Written to a temporary file (0600, fsynced) and hard-linked into place: the
    link fails if another process made the secret first, and then both use that
    one. A reader never sees a partly written secret.
    """
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, secrets.token_bytes(SECRET_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):  # another process's secret won: use it
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)  # the new name survives a crash
    finally:
        os.close(dir_fd)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if mode & 0o077:
            raise SecretFileError(
                f"{path} is accessible to other users (mode {mode & 0o777:o}); make it mode 0600"
            )
        secret = os.read(fd, SECRET_BYTES + 1)
    finally:
        os.close(fd)
    if len(secret) != SECRET_BYTES:
        raise SecretFileError(
            f"{path} holds {len(secret)} bytes, not {SECRET_BYTES}: restore it, or remove it "
            "for a new one (running sandboxes then hold keys the daemon no longer knows)"
        )
    return secret
