"""The rollout's side of the gateway's admin API (`/admin/ab`, `/admin/engines`).

    admin = GatewayAdmin(url, key)
    admin.set_ab(share=0.05, actor="controller")
    engine_entry(admin.engines(), Role.CHALLENGER)   # {"base_url", "served_name", "model", ...}

The controller changes traffic only through this API, never by importing the gateway, so the
gateway may run in another process or on another machine. Transport failures and non-2xx
answers become one `GatewayAdminError` line (the controller logs it and tries next tick).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from stillhouse.common.errors import StillhouseError


class GatewayAdminError(StillhouseError):
    """The gateway's admin API could not be reached or refused the call."""


def engine_entry(engines: Mapping[str, Any], role: str) -> dict[str, Any] | None:
    """One role's entry in a `GET /admin/engines` answer (`{"engines": {role: {...}}}`, or the
    role map itself), or None when the gateway lists no engine for it."""
    listed = engines.get("engines", engines)
    entry = listed.get(role) if isinstance(listed, Mapping) else None
    return entry if isinstance(entry, dict) else None


class GatewayAdmin:
    """A client of the gateway's admin API, authenticated with its admin key."""

    def __init__(self, url: str, key: str | None, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(timeout=timeout_s, headers=headers)

    @classmethod
    def from_environment(cls, url: str, key_env: str, environ: Mapping[str, str]) -> GatewayAdmin:
        key = environ.get(key_env, "").strip()
        if not key:
            raise GatewayAdminError(
                f"${key_env} is empty: the controller needs the gateway's admin key"
            )
        return cls(url, key)

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        try:
            response = self._client.request(method, self.url + path, json=body)
        except httpx.HTTPError as exc:
            raise GatewayAdminError(f"gateway {self.url} unreachable ({exc})") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise GatewayAdminError(
                f"gateway {method} {path} answered {response.status_code}: {message}"
            )
        return response.json()

    def ab(self) -> dict[str, Any]:
        return self._call("GET", "/admin/ab")

    def set_ab(
        self, *, share: float | None = None, mirror: float | None = None, actor: str
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"actor": actor}
        if share is not None:
            body["challenger_share"] = share
        if mirror is not None:
            body["mirror_share"] = mirror
        return self._call("POST", "/admin/ab", body)

    def engines(self) -> dict[str, Any]:
        return self._call("GET", "/admin/engines")

    def refresh(self) -> dict[str, Any]:
        """Ask the gateway to look at the registry aliases now (after a promotion)."""
        return self._call("POST", "/admin/engines/refresh")

    def close(self) -> None:
        self._client.close()
