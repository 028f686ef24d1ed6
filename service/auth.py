"""API keys: ``Authorization: Bearer <key>`` on every endpoint except ``/healthz`` and ``/readyz``.

A key reads ``msk_<id>_<secret>``: ``<id>`` (12 hex digits) is public and names the key in logs,
job ownership and ``medseg keys list``; only the SHA-256 of the whole key is stored, and it is
compared in constant time (``hmac.compare_digest``). The key itself is shown once, at creation.

Roles are ordered: ``read`` (list models, read its own jobs and results, metrics) < ``submit``
(also create and cancel its own jobs, STOW-RS) < ``admin`` (sees and cancels every job). A
non-admin key sees only the jobs it created.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select

from medseg.errors import ConfigError
from service.problems import Problem
from service.store import ApiKey, Store

ROLES = ("read", "submit", "admin")
_KEY = re.compile(r"^msk_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="medseg"'}
# declares the scheme in the OpenAPI document; the header itself is checked by authenticate()
bearer_scheme = HTTPBearer(
    auto_error=False, scheme_name="apiKey", description="a medseg API key: `medseg keys create --role submit`"
)


@dataclass(frozen=True)
class Principal:
    """The caller: its key id and role."""

    key_id: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def allows(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(store: Store, role: str, name: str = "") -> tuple[str, ApiKey]:
    """A new key of ``role``; returns ``(key, row)``. The key is not stored and cannot be shown again.

    Raises:
        ConfigError: unknown role.
    """
    if role not in ROLES:
        raise ConfigError(f"unknown role '{role}' (choose from {', '.join(ROLES)})")
    key_id = secrets.token_hex(6)
    key = f"msk_{key_id}_{secrets.token_urlsafe(32)}"
    row = ApiKey(id=key_id, name=name, role=role, sha256=_digest(key), created_at=time.time())
    store.add(row)
    return key, row


def list_keys(store: Store) -> list[ApiKey]:
    with store.session() as session:
        return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_key(store: Store, key_id: str) -> bool:
    """Revoke a key by id; False if there is no such active key."""
    with store.session() as session:
        row = session.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = time.time()
        return True


def authenticate(store: Store, authorization: str | None) -> Principal:
    """The principal for an ``Authorization`` header value.

    Raises:
        Problem: 401 when the header is missing, malformed, or the key unknown or revoked.
    """
    if not authorization:
        raise Problem(401, "unauthorized", "an API key is required: 'Authorization: Bearer <key>'", _CHALLENGE)
    scheme, _, token = authorization.strip().partition(" ")
    match = _KEY.match(token.strip()) if scheme.lower() == "bearer" else None
    if match is None:
        raise Problem(401, "unauthorized", "malformed Authorization header (expected 'Bearer msk_...')", _CHALLENGE)
    with store.session() as session:
        row = session.get(ApiKey, match.group(1))
    # compare even when the id is unknown, so timing does not tell which ids exist
    expected = row.sha256 if row is not None else "0" * 64
    valid = hmac.compare_digest(expected, _digest(token.strip()))
    if row is None or not valid or row.revoked_at is not None:
        raise Problem(401, "unauthorized", "unknown or revoked API key", _CHALLENGE)
    return Principal(key_id=row.id, role=row.role)


def require(role: str):
    """A FastAPI dependency: the authenticated :class:`Principal`, at least ``role`` (else 403)."""

    def dependency(request: Request, _: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)) -> Principal:
        principal = authenticate(request.app.state.store, request.headers.get("authorization"))
        if not principal.allows(role):
            raise Problem(403, "forbidden", f"this key's role '{principal.role}' may not do this (needs '{role}')")
        request.state.principal = principal
        return principal

    dependency.__name__ = f"require_{role}"
    return dependency
