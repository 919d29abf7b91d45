"""API keys of the public APIs (the orchestrator's Generator, the HTTP gateway), and the
internal token that keeps the model services to the orchestrators.

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

import grpc

from services.config import ConfigError


class Unauthenticated(Exception):
    """No key, or a key that is not configured (UNAUTHENTICATED, HTTP 401)."""


def key_id(key: str) -> str:
    """What a session stores of the key that created it."""
    return hashlib.sha256(b"specd-key-id\0" + key.encode()).hexdigest()[:32]


def secret_lines(env: Mapping[str, str], name: str, what: str) -> list[str]:
    """The non-blank, non-comment lines of the file the variable `name` names ([] when unset);
    ConfigError for a file that cannot be read or holds none."""
    file = env.get(name, "").strip()
    if not file:
        return []
    try:
        lines = Path(file).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ConfigError(f"{name}: cannot read {file}: {err}") from None
    found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not found:
        raise ConfigError(f"{name}: {file} holds no {what} (one a line)")
    return found


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `authorization: Bearer KEY` value, None without one."""
    scheme, _, key = (authorization or "").strip().partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in dict.fromkeys(keys)]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ApiKeys:
        keys = [k.strip() for k in env.get("SPECD_API_KEYS", "").split(",") if k.strip()]
        keys += secret_lines(env, "SPECD_API_KEYS_FILE", "key")
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
        key = bearer_key(authorization)
        if key is None:
            raise Unauthenticated("an API key is required: send 'authorization: Bearer KEY'")
        digest = hashlib.sha256(key.encode()).digest()
        known = False
        for candidate in self._digests:  # all of them, whatever matched
            known |= hmac.compare_digest(digest, candidate)
        if not known:
            raise Unauthenticated("the API key is not valid")
        return key_id(key)


OPEN_WARNING = "no API key configured (SPECD_API_KEYS_FILE, SPECD_API_KEYS): anyone who reaches %s can use every session"


# -- internal traffic ---------------------------------------------------------------------------
#
# Drafters and verifiers take calls from orchestrators only: with SPECD_INTERNAL_TOKEN_FILE (or
# SPECD_INTERNAL_TOKEN) set on both sides, every Drafter and Verifier call carries the token and
# a model service refuses one without it (UNAUTHENTICATED). Health checking and reflection stay
# open, so the kubelet's native gRPC probes (which cannot present credentials or TLS) keep
# working. A shared token rather than mutual TLS: it needs no certificates to issue and rotate,
# and a Secret carries it; it does not encrypt the traffic, which stays inside the cluster
# network (mutual TLS is the step after).

TOKEN_HEADER = "x-specd-internal-token"


def internal_token(env: Mapping[str, str]) -> str:
    """The internal token ("" = none): SPECD_INTERNAL_TOKEN_FILE's content, else SPECD_INTERNAL_TOKEN."""
    from_file = secret_lines(env, "SPECD_INTERNAL_TOKEN_FILE", "token")
    return from_file[0] if from_file else env.get("SPECD_INTERNAL_TOKEN", "").strip()


class RequireToken(grpc.aio.ServerInterceptor):
    """Refuses calls to `services` (full names) that do not carry the internal token."""

    def __init__(self, token: str, services: Iterable[str]) -> None:
        self._digest = hashlib.sha256(token.encode()).digest()
        self._services = set(services)

        async def refuse(request, context: grpc.aio.ServicerContext):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this service takes calls from specd orchestrators only")

        self._refusal = grpc.unary_unary_rpc_method_handler(refuse)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.split("/")[1] not in self._services:
            return await continuation(details)
        sent = dict(details.invocation_metadata or ()).get(TOKEN_HEADER, "")
        if hmac.compare_digest(hashlib.sha256(sent.encode()).digest(), self._digest):
            return await continuation(details)
        return self._refusal


class SendToken(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the internal token to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._metadata = ((TOKEN_HEADER, token),)

    async def intercept_unary_unary(self, continuation, details: grpc.aio.ClientCallDetails, request):
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._metadata)
        details = grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                             details.wait_for_ready)  # fmt: skip
        return await continuation(details, request)
