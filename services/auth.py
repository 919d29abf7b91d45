"""API keys of the public APIs (the orchestrator's Generator, the HTTP gateway).

A caller sends `authorization: Bearer KEY` (gRPC metadata, or the HTTP header). Keys come
from SPECD_API_KEYS_FILE (one a line; blank lines and `#` comments ignored: a mounted
Kubernetes Secret) and SPECD_API_KEYS (comma-separated). With no key configured the API is
open, and the process says so when it starts.

A key is known by its id, a hash of it: sessions store the id of the key that created them,
and another key gets NOT_FOUND for them, so one caller can neither read nor delete another's
session. Keys are compared as SHA-256 digests, each with hmac.compare_digest and every
configured key tried, so the time taken says nothing about how much of a key was right.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from pathlib import Path

from services.config import ConfigError


class Unauthenticated(Exception):
    """No key, or a key that is not configured (UNAUTHENTICATED, HTTP 401)."""


def key_id(key: str) -> str:
    """What a session stores of the key that created it."""
    return hashlib.sha256(b"specd-key-id\0" + key.encode()).hexdigest()[:32]


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in dict.fromkeys(keys)]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ApiKeys:
        keys = [k.strip() for k in env.get("SPECD_API_KEYS", "").split(",") if k.strip()]
        file = env.get("SPECD_API_KEYS_FILE", "").strip()
        if file:
            try:
                lines = Path(file).read_text(encoding="utf-8").splitlines()
            except OSError as err:
                raise ConfigError(f"SPECD_API_KEYS_FILE: cannot read {file}: {err}") from None
            from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not from_file:
                raise ConfigError(f"SPECD_API_KEYS_FILE: {file} holds no key (one a line)")
            keys += from_file
        return cls(keys)

    @property
    def open(self) -> bool:
        return not self._digests

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, authorization: str | None) -> str:
        """The key id of an `authorization` value ("" when the API is open); raises
        Unauthenticated for a missing or unknown key."""
        if self.open:
            return ""
        scheme, _, key = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("an API key is required: send 'authorization: Bearer KEY'")
        digest = hashlib.sha256(key.strip().encode()).digest()
        known = False
        for candidate in self._digests:  # all of them, whatever matched
            known |= hmac.compare_digest(digest, candidate)
        if not known:
            raise Unauthenticated("the API key is not valid")
        return key_id(key.strip())


OPEN_WARNING = "no API key configured (SPECD_API_KEYS_FILE, SPECD_API_KEYS): anyone who reaches %s can use every session"
