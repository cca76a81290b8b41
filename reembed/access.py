"""Who may call what: a read key (``REEMBED_API_KEY``: search, aliases, status, history, events,
metrics) and an admin key (``REEMBED_ADMIN_KEY``: everything that changes state; it reads too).

Keys are compared in constant time (``hmac.compare_digest``) against both, and never logged. A
request without a known key is 401; a read key on an admin route is 403, as is any admin route
while no admin key is set (the control API is off).
"""

from __future__ import annotations

import hmac
from typing import Annotated, Literal

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from reembed.settings import Settings

Scope = Literal["read", "admin"]
#: Module level: FastAPI resolves the (postponed) annotations of dependencies in this module's globals.
bearer = HTTPBearer(auto_error=False)


class Unauthorised(Exception):
    """No key, or one that is neither the read nor the admin key (401)."""


class Forbidden(Exception):
    """A known key without the scope the route needs, or the control API switched off (403)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _same(given: str, expected: str) -> bool:
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


class Keys:
    """The two dependencies routes declare: ``Depends(keys.read)`` and ``Depends(keys.admin)``."""

    def __init__(self, settings: Settings) -> None:
        self.read_key = settings.api_key
        self.admin_key = settings.admin_key

    def scope_of(self, given: str) -> Scope | None:
        admin, read = _same(given, self.admin_key), _same(given, self.read_key)  # both: same time either way
        return "admin" if admin else "read" if read else None

    def read(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if not self.read_key:
            return  # search is open unless a read key is set
        if self.scope_of(credentials.credentials if credentials else "") is None:
            raise Unauthorised()

    def admin(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if not self.admin_key:
            raise Forbidden("the control API is off: set REEMBED_ADMIN_KEY on the server and send it as "
                            "Authorization: Bearer <key>")
        scope = self.scope_of(credentials.credentials if credentials else "")
        if scope is None:
            raise Unauthorised()
        if scope != "admin":
            raise Forbidden("this key may read, not change state: send REEMBED_ADMIN_KEY for this request")
