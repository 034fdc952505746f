"""Who may call the gateway: client API keys and the admin key, from the environment only.

    keys = load_keys(settings, os.environ)   # raises ConfigError: no client keys off loopback
    authorize_client(request)                # raises AuthenticationFailed (401)
    authorize_admin(request)                 # PermissionDenied (403) when no admin key is set

Keys are compared in constant time, each against every configured key.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from stillhouse.common.config import Settings
from stillhouse.common.errors import ConfigError
from stillhouse.serving.gateway.errors import AuthenticationFailed, PermissionDenied


@dataclass(frozen=True)
class Keys:
    clients: tuple[bytes, ...]
    admin: bytes | None


KEYS = web.AppKey("keys", Keys)


def load_keys(settings: Settings, environ: Mapping[str, str]) -> Keys:
    """Client keys (comma-separated) and the admin key from the environment, never from YAML.
    Without client keys the gateway only listens on loopback."""
    gw = settings.gateway
    client_keys = [k.strip() for k in environ.get(gw.api_keys_env, "").split(",") if k.strip()]
    admin_key = environ.get(gw.admin_key_env, "").strip()
    engine_key = settings.engine.key or ""
    refuse_placeholders(
        {
            gw.api_keys_env: client_keys,
            gw.admin_key_env: [admin_key],
            "engine.api_key": [engine_key],
            gw.traffic_log.user_hash_key_env: [environ.get(gw.traffic_log.user_hash_key_env, "")],
        }
    )
    clients = tuple(k.encode() for k in client_keys)
    admin = admin_key.encode() or None
    if not clients and not _is_loopback(gw.host):
        raise ConfigError(
            f"gateway.host is {gw.host}, but ${gw.api_keys_env} is empty: "
            "set client API keys before listening beyond loopback"
        )
    return Keys(clients, admin)


PLACEHOLDER_PREFIX = "change-me"  # what the shipped deploy files hold until an operator sets keys


def refuse_placeholders(secrets_by_name: Mapping[str, list[str]]) -> None:
    """Raise `ConfigError` (one line) when a secret still holds a shipped placeholder."""
    for name, values in secrets_by_name.items():
        if any(v.strip().lower().startswith(PLACEHOLDER_PREFIX) for v in values):
            raise ConfigError(
                f"{name} still holds a placeholder ('{PLACEHOLDER_PREFIX}-...'): set a real "
                "secret before starting (deploy/README.md, Security)"
            )


def load_user_hash_key(settings: Settings, environ: Mapping[str, str]) -> bytes:
    """The secret the user hash is keyed with: from `traffic_log.user_hash_key_env`, else a
    random key made once and kept in <state_dir>/secrets/user-hash.key (readable by the owner
    only), so hashes stay stable across restarts of this gateway."""
    given = environ.get(settings.gateway.traffic_log.user_hash_key_env, "").strip()
    if given:
        return given.encode()
    path = settings.state_dir / "secrets" / "user-hash.key"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = secrets.token_hex(32).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
        return key
    except FileExistsError:  # another gateway made it first
        return path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot keep the user-hash key at {path}: {exc.strerror}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bearer(request: web.Request) -> bytes:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # surrogateescape: a header that was not UTF-8 on the wire is just a key that matches none
    return token.strip().encode("utf-8", "surrogateescape") if scheme.lower() == "bearer" else b""


def _matches(presented: bytes, keys: tuple[bytes, ...]) -> bool:
    # Compare against every key, constant time each, so timing says nothing about which or how
    # much of a key matched.
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, key)
    return found


def authorize_client(request: web.Request) -> None:
    keys = request.app[KEYS]
    if keys.clients and not _matches(_bearer(request), keys.clients):
        raise AuthenticationFailed(
            "invalid or missing API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )


def authorize_admin(request: web.Request) -> None:
    keys = request.app[KEYS]
    if keys.admin is None:
        raise PermissionDenied(
            "the admin API is disabled: set the admin key in the gateway's environment"
        )
    if not _matches(_bearer(request), (keys.admin,)):
        raise AuthenticationFailed("invalid or missing admin key", code="invalid_api_key")
