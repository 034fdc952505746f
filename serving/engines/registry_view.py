"""The registry as `stillhouse serve` reads it, and what it last said, kept in the state dir so
the gateway starts while MLflow is down: on the versions its aliases last named, whose weights
the model cache already holds.

    registry = RegistryCache.for_settings(settings)
    registry.lookup("models:/stillhouse-student@champion")  # live, written through (the watcher)
    registry.at_start().lookup(ref)  # live, or when MLflow is unreachable the last answer

Only `RegistryUnreachable` falls back: an answer of the registry's own ("no such version")
stands. Each fallback is noted in `fallbacks` (shown by `/admin/engines`) until a live answer
for the same reference clears it, which is how the gateway says it is watching again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from stillhouse.common.config import Settings
from stillhouse.common.registry import RegistryClient, RegistryUnreachable, VersionInfo, parse_ref
from stillhouse.serving.engines.model_cache import models_root

log = logging.getLogger("stillhouse.registry_cache")

CACHE_SCHEMA = 1


class RegistryView(Protocol):
    """The registry as serving needs it (blocking calls; run them in a worker thread)."""

    def lookup(self, ref: str) -> VersionInfo | None:
        """The version `ref` names now; None when its alias is unset."""
        ...

    def download(self, uri: str) -> Path: ...


class MlflowRegistryView:
    """`RegistryView` over the configured MLflow registry (any registered model name)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._clients: dict[str, RegistryClient] = {}
        self._lock = threading.Lock()

    def _client(self, name: str) -> RegistryClient:
        with self._lock:
            if name not in self._clients:
                base = RegistryClient.from_settings(self._settings)
                if base.registered_model != name:
                    base = RegistryClient(base.tracking_uri, name, base.artifact_root)
                self._clients[name] = base
            return self._clients[name]

    def lookup(self, ref: str) -> VersionInfo | None:
        parsed = parse_ref(ref, self._settings.mlflow.registered_model)
        client = self._client(parsed.name)
        if parsed.alias is not None:
            return client.get_alias(parsed.alias)
        return client.resolve(str(parsed))

    def download(self, uri: str) -> Path:
        """A version's weights; a version already in the cache needs no registry."""
        parsed = parse_ref(uri, self._settings.mlflow.registered_model)
        return self._client(parsed.name).download(uri, models_root(self._settings))


@dataclass(frozen=True)
class Fallback:
    """A reference answered from the cache because the registry was unreachable."""

    ref: str
    answer: str | None  # the version URI it named then; None: the alias was unset
    stored_at: float  # epoch seconds: when the registry gave that answer
    error: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "answer": self.answer,
            "stored_at": self.stored_at,
            "error": self.error,
        }


class RegistryCache:
    """A `RegistryView` that writes every live answer to `path`; see the module docstring."""

    def __init__(
        self, inner: RegistryView, path: Path, clock: Callable[[], float] = time.time
    ) -> None:
        self._inner, self.path, self._clock = inner, path, clock
        self._lock = threading.Lock()
        self._warned: set[str] = set()  # read / write problems, each said once until it heals
        self.fallbacks: dict[str, Fallback] = {}

    @classmethod
    def for_settings(cls, settings: Settings) -> RegistryCache:
        return cls(MlflowRegistryView(settings), settings.state_dir / "cache" / "registry.json")

    def lookup(self, ref: str) -> VersionInfo | None:
        info = self._inner.lookup(ref)
        with self._lock:
            answers = self._read()
            answers[ref] = {"at": self._clock(), "info": info.to_dict() if info else None}
            self._write(answers)
            if self.fallbacks.pop(ref, None) is not None:
                log.info("the registry answers again: %s is %s", ref, info.uri if info else None)
        return info

    def lookup_or_last(self, ref: str) -> VersionInfo | None:
        """`lookup`, or when the registry is unreachable, its last answer for `ref`."""
        try:
            return self.lookup(ref)
        except RegistryUnreachable as exc:
            with self._lock:
                entry = self._read().get(ref)
            if entry is None:
                raise RegistryUnreachable(
                    f"{exc}; no earlier answer for {ref} is cached in {self.path} "
                    "(a gateway that once started with MLflow up can start without it)"
                ) from None
            info = VersionInfo.from_dict(entry["info"]) if entry["info"] is not None else None
            fallback = Fallback(ref, info.uri if info else None, float(entry["at"]), str(exc))
            self.fallbacks[ref] = fallback
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(fallback.stored_at))
            log.warning(
                "%s; using its last answer for %s (%s, from %s) until it answers again",
                exc,
                ref,
                fallback.answer or "unset",
                when,
            )
            return info

    def download(self, uri: str) -> Path:
        return self._inner.download(uri)

    def at_start(self) -> RegistryView:
        """This cache as a view that falls back to the last answers (for start-up)."""
        return _LastKnown(self)

    def status(self) -> dict[str, Any]:
        """What `/admin/engines` shows under `registry`."""
        return {
            "cache": str(self.path),
            "from_cache": {ref: f.as_dict() for ref, f in sorted(self.fallbacks.items())},
        }

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # unreadable: start from nothing, say so
            self._warn("read", f"ignoring the registry cache {self.path}: {exc}")
            return {}
        self._warned.discard("read")
        if not isinstance(data, dict) or data.get("schema") != CACHE_SCHEMA:
            return {}
        answers = data.get("answers")
        return answers if isinstance(answers, dict) else {}

    def _write(self, answers: dict[str, Any]) -> None:
        # Best effort: a full disk must not turn a live answer into a failed lookup.
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"schema": CACHE_SCHEMA, "answers": answers}))
            os.replace(tmp, self.path)
            self._warned.discard("write")
        except OSError as exc:
            self._warn("write", f"cannot write the registry cache {self.path}: {exc}")
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            log.warning("%s", message)
        self._warned.add(kind)


class _LastKnown:
    def __init__(self, cache: RegistryCache) -> None:
        self._cache = cache

    def lookup(self, ref: str) -> VersionInfo | None:
        return self._cache.lookup_or_last(ref)

    def download(self, uri: str) -> Path:
        return self._cache.download(uri)
