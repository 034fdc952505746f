"""The thin MLflow model-registry client the rest of Stillhouse uses.

    registry = RegistryClient.from_settings(settings)
    info = registry.register_version(run_id, Path("student"), {"dataset_hash": "ab12"})
    path = registry.download("models:/stillhouse-student@champion", cache_dir)  # vLLM serves it

Students are plain transformers directories (config.json, weights, tokenizer), logged as run
artifacts under `model/` and registered with the source `runs:/<run_id>/model`; no MLflow model
flavor is involved, so a download is a directory vLLM can serve as is.

Every MLflow, HTTP or file-system failure is translated in one place (`RegistryClient._call`) into
a `RegistryError` with one line a user can act on; no MLflow object leaves this module.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from rich.markup import escape
from rich.table import Table

from stillhouse.common.errors import StillhouseError
from stillhouse.common.formatting import number

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from stillhouse.common.config import Settings

MODEL_ARTIFACT_PATH = "model"
DEFAULT_ALIAS = "challenger"
DEFAULT_TABLE_TAGS = ("teacher", "data_window")
_ALIAS_RE = re.compile(r"[A-Za-z0-9_-]{1,255}")
_RESERVED_ALIAS_RE = re.compile(r"latest|v\d+", re.IGNORECASE)
_NAME_FORBIDDEN = ("/", ":", "'", '"', "@")
_T = TypeVar("_T")


class RegistryError(StillhouseError):
    """The registry is unreachable, or a model, version or alias does not exist."""


class RegistryUnreachable(RegistryError):
    """No answer from the registry at all (refused, timed out, no connection): what was true
    before may still be; a `RegistryError` that is not this one is the registry's own answer."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: exactly one of `version` and `alias` is set."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.alias is not None:
            return f"models:/{self.name}@{self.alias}"
        return f"models:/{self.name}/{self.version}"


def version_uri(name: str, version: int) -> str:
    """`models:/NAME/VERSION`: the one way to name a registered version."""
    return str(ModelRef(name, version=version))


def alias_uri(name: str, alias: str) -> str:
    """`models:/NAME@ALIAS`: the one way to name what an alias points at."""
    return str(ModelRef(name, alias=alias))


@dataclass(frozen=True)
class VersionInfo:
    """One registered version as plain data (tags and metrics do not take part in hashing)."""

    name: str
    version: int
    aliases: tuple[str, ...]
    created: datetime
    run_id: str | None
    source: str
    tags: dict[str, str] = field(default_factory=dict, hash=False)
    metrics: dict[str, float] = field(default_factory=dict, hash=False)

    @property
    def uri(self) -> str:
        return version_uri(self.name, self.version)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (the gateway's registry cache keeps these)."""
        return {
            "name": self.name,
            "version": self.version,
            "aliases": list(self.aliases),
            "created": self.created.isoformat(),
            "run_id": self.run_id,
            "source": self.source,
            "tags": dict(self.tags),
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VersionInfo:
        return cls(
            name=str(data["name"]),
            version=int(data["version"]),
            aliases=tuple(data.get("aliases", ())),
            created=datetime.fromisoformat(data["created"]),
            run_id=data.get("run_id"),
            source=str(data.get("source", "")),
            tags={str(k): str(v) for k, v in data.get("tags", {}).items()},
            metrics={str(k): float(v) for k, v in data.get("metrics", {}).items()},
        )


def check_alias(alias: str) -> str:
    """Reject alias names MLflow would refuse, before any network round trip."""
    if not _ALIAS_RE.fullmatch(alias):
        raise RegistryError(
            f"invalid alias {alias!r}: use letters, digits, '_' and '-' (e.g. 'champion')"
        )
    if _RESERVED_ALIAS_RE.fullmatch(alias):
        raise RegistryError(f"invalid alias {alias!r}: 'latest' and 'v<number>' are reserved")
    return alias


def parse_ref(ref: str, default_model: str) -> ModelRef:
    """`models:/name@alias`, `models:/name/<version>`, or a bare alias or version number of
    `default_model`. Stages and `latest` are refused: Stillhouse moves aliases, not stages."""
    text = ref.strip()
    usage = (
        f"invalid model reference {ref!r}: use models:/NAME@ALIAS, models:/NAME/VERSION, "
        f"or an alias of {default_model} such as 'champion'"
    )
    name, version, alias = default_model, "", ""
    if text.startswith("models:/"):
        body = text[len("models:/") :]
        if "/" in body:
            name, _, version = body.partition("/")
        elif "@" in body:
            name, _, alias = body.rpartition("@")
        else:
            raise RegistryError(f"{usage} (no version or alias given)")
        _checked(name, usage)
    elif not text or any(c in text for c in ":/@"):
        raise RegistryError(usage)
    elif text.isdigit():
        version = text
    else:
        alias = text
    if not version:
        return ModelRef(name, alias=check_alias(alias))
    if not version.isdigit() or int(version) < 1:
        raise RegistryError(f"{usage} (the version must be a positive number)")
    return ModelRef(name, version=int(version))


def _checked(name: str, usage: str) -> str:
    # The name is quoted into search filters and URIs, so quotes and separators are refused.
    if not name.strip() or any(c in name for c in _NAME_FORBIDDEN):
        raise RegistryError(usage)
    return name


def _quote(value: str) -> str:
    # MLflow's filter grammar has no escape for quotes inside literals.
    if "'" in value or "`" in value:
        raise RegistryError(f"tag keys and values to look up must not contain quotes: {value}")
    return value


class RegistryClient:
    """Registered versions of one model (`registered_model`) in one MLflow instance.

    `artifact_root` only matters for a local (SQLite) backend: MLflow would otherwise put run
    artifacts in `./mlruns` relative to the working directory. Pass None for a tracking server,
    which decides where artifacts go. HTTP retries and timeout default low (MLflow's own default
    retries for minutes); the `MLFLOW_HTTP_REQUEST_*` environment variables, when set, win.
    """

    def __init__(
        self,
        tracking_uri: str,
        registered_model: str,
        artifact_root: Path | None = None,
        *,
        http_retries: int = 2,
        http_timeout_s: int = 60,
    ) -> None:
        self.tracking_uri = tracking_uri
        bad_name = f"invalid registered model name {registered_model!r}: no / : @ or quotes"
        self.registered_model = _checked(registered_model, bad_name)
        self.artifact_root = artifact_root
        self._http_env = {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(http_retries),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(http_timeout_s),
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
        self._mlflow: MlflowClient | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RegistryClient:
        """The configured registry; a tracking server keeps its own artifact location."""
        server = settings.tracking_uri.startswith(("http://", "https://", "databricks"))
        root = None if server else settings.artifact_root
        return cls(settings.tracking_uri, settings.mlflow.registered_model, root)

    # -- the one boundary ---------------------------------------------------------------------

    def _client(self) -> MlflowClient:
        if self._mlflow is None:
            from mlflow import MlflowClient

            # The registry URI is given explicitly so that a stray MLFLOW_REGISTRY_URI (or an
            # mlflow.set_registry_uri() elsewhere in the process) cannot split the two.
            self._mlflow = MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)
        return self._mlflow

    @contextlib.contextmanager
    def _call(self, doing: str, *, missing: str | None = None) -> Iterator[None]:
        """Run MLflow calls with our HTTP limits; translate whatever they raise to one line.

        MLflow reads its HTTP settings from the environment on every request and offers no
        per-client setting, so they are set for the duration of the call (only where the user has
        not set them) and restored afterwards. The environment is process-wide: two threads in
        calls at once may see MLflow's defaults for part of a call, never a wrong answer.
        """
        import requests
        from mlflow.exceptions import MlflowException

        # (SQLAlchemy errors of a local store arrive wrapped in MlflowException.)
        added = {k: v for k, v in self._http_env.items() if k not in os.environ}
        os.environ.update(added)
        try:
            yield
        except RegistryError:
            raise
        except (MlflowException, requests.RequestException, OSError) as e:
            raise self._translate(e, doing, missing) from e
        finally:
            for key in added:
                os.environ.pop(key, None)

    @contextlib.contextmanager
    def session(self, doing: str) -> Iterator[MlflowClient]:
        """The MlflowClient for run tracking (params, metrics, artifacts), inside the same error
        boundary: whatever it raises leaves as a one-line `RegistryError` about `doing`."""
        with self._call(doing):
            yield self._client()

    def _translate(self, e: BaseException, doing: str, missing: str | None) -> RegistryError:
        import requests

        chain = _causes(e)
        unreachable = f"cannot reach MLflow at {self.tracking_uri}"
        if any(isinstance(c, ConnectionRefusedError) for c in chain):
            return RegistryUnreachable(f"{unreachable}: connection refused")
        if any(isinstance(c, requests.Timeout) for c in chain):
            timeout = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "?")
            return RegistryUnreachable(f"{unreachable}: no answer within {timeout} s")
        if any(isinstance(c, requests.ConnectionError) for c in chain):
            return RegistryUnreachable(f"{unreachable}: {_first_line(chain[-1])}")
        if missing and _is_missing(e):
            return RegistryError(missing)
        code = getattr(e, "error_code", "")
        return RegistryError(f"{doing} failed: {_first_line(e).removeprefix(f'{code}: ')}")

    # -- experiments and registration ---------------------------------------------------------

    def ensure_experiment(self, name: str) -> str:
        """The experiment's id, creating it (artifacts under `artifact_root`) if needed."""
        with self._call(f"open experiment {name!r}"):
            client = self._client()
            exp = client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    client.restore_experiment(exp.experiment_id)
                return str(exp.experiment_id)
            location = None
            if self.artifact_root is not None:
                safe = re.sub(r"[^\w.-]", "_", name)
                location = (self.artifact_root / safe).resolve().as_uri()
            return str(client.create_experiment(name, artifact_location=location))

    def register_version(
        self,
        run_id: str,
        model_dir: Path,
        tags: Mapping[str, str],
        alias: str | None = DEFAULT_ALIAS,
    ) -> VersionInfo:
        """Log `model_dir` under the run's `model/` artifacts and register it as a new version.

        Tags go into the create call itself, so a version never exists without them (duplicate
        detection by `find_version` relies on them).
        """
        if not (model_dir / "config.json").is_file():
            raise RegistryError(f"not a model directory (no config.json): {model_dir}")
        if alias is not None:
            check_alias(alias)
        name = self.registered_model
        missing = f"no MLflow run {run_id} at {self.tracking_uri}"
        with self._call(f"register {model_dir} as a version of {name}", missing=missing):
            client = self._client()
            client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT_PATH)
            if _unless_missing(lambda: client.get_registered_model(name)) is None:
                client.create_registered_model(name)
            mv = client.create_model_version(
                name,
                f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}",
                run_id=run_id,
                tags={str(k): str(v) for k, v in tags.items()},
            )
            if alias is not None:
                client.set_registered_model_alias(name, alias, str(mv.version))
            return self._info(client.get_model_version(name, str(mv.version)))

    # -- lookups --------------------------------------------------------------------------------

    def find_version(self, tags: Mapping[str, str]) -> VersionInfo | None:
        """The newest version whose tags include all of `tags`, or None."""
        clauses = [f"name='{self.registered_model}'"]
        clauses += [f"tags.`{_quote(k)}` = '{_quote(str(v))}'" for k, v in tags.items()]
        with self._call(f"search versions of {self.registered_model}"):
            found = self._search(" and ".join(clauses))
            if not found:
                return None
            newest = max(found, key=lambda mv: int(mv.version))
            # Search results carry no aliases; a direct get does.
            return self._info(self._client().get_model_version(newest.name, str(newest.version)))

    def list_versions(self) -> list[VersionInfo]:
        """All versions, newest first, with aliases and their runs' latest metrics."""
        with self._call(f"list versions of {self.registered_model}"):
            found = self._search(f"name='{self.registered_model}'")
            aliases: dict[int, list[str]] = {}
            for alias, version in self._aliases().items():
                aliases.setdefault(int(version), []).append(alias)
            metrics = {run_id: self._run_metrics(run_id) for run_id in {mv.run_id for mv in found}}
            infos = [
                self._info(mv, aliases.get(int(mv.version), []), metrics[mv.run_id]) for mv in found
            ]
        return sorted(infos, key=lambda v: v.version, reverse=True)

    def resolve(self, ref: str) -> VersionInfo:
        """The version a reference points at now (an alias is looked up on every call)."""
        parsed = parse_ref(ref, self.registered_model)
        if parsed.alias is not None:
            missing = f"no version of {parsed.name} has alias '{parsed.alias}'"
            with self._call(f"resolve {parsed}", missing=missing):
                mv = self._client().get_model_version_by_alias(parsed.name, parsed.alias)
                return self._info(mv)
        missing = f"{parsed.name} has no version {parsed.version}"
        with self._call(f"resolve {parsed}", missing=missing):
            return self._info(self._client().get_model_version(parsed.name, str(parsed.version)))

    def resolve_version(self, version: int) -> VersionInfo:
        """Version `version` of this registry's model."""
        return self.resolve(self.version_uri(version))

    def version_uri(self, version: int) -> str:
        return version_uri(self.registered_model, version)

    def alias_uri(self, alias: str) -> str:
        return alias_uri(self.registered_model, alias)

    def get_alias(self, alias: str) -> VersionInfo | None:
        """The version holding `alias`, or None when no version (or no model) has it."""
        name = self.registered_model
        with self._call(f"look up alias {check_alias(alias)!r} of {name}"):
            client = self._client()
            mv = _unless_missing(lambda: client.get_model_version_by_alias(name, alias))
            return None if mv is None else self._info(mv)

    # -- aliases and tags -----------------------------------------------------------------------

    def set_alias(self, alias: str, version: int) -> None:
        """Point `alias` at `version` (moving it away from whichever version held it)."""
        name = self.registered_model
        with self._call(f"set alias {alias!r}", missing=f"{name} has no version {version}"):
            self._client().set_registered_model_alias(name, check_alias(alias), str(version))

    def delete_alias(self, alias: str) -> None:
        """Remove `alias`; removing an alias no version holds is not an error (MLflow agrees)."""
        name = self.registered_model
        with self._call(f"delete alias {alias!r}", missing=f"no registered model named {name}"):
            self._client().delete_registered_model_alias(name, check_alias(alias))

    def set_version_tags(self, version: int, tags: Mapping[str, str]) -> None:
        name = self.registered_model
        with self._call(f"tag version {version}", missing=f"{name} has no version {version}"):
            for key, value in tags.items():
                self._client().set_model_version_tag(name, str(version), str(key), str(value))

    # -- download -------------------------------------------------------------------------------

    def download(self, ref: str, cache_dir: Path) -> Path:
        """The version's model directory under `cache_dir/<name>/<version>/`, fetched once.

        The files land in a hidden temporary directory that is renamed into place only when
        complete, so an interrupted download never looks like a cached one. A cached version
        number needs no registry at all; an alias is always looked up, since it moves.
        """
        parsed = parse_ref(ref, self.registered_model)
        cached = cache_dir / parsed.name / str(parsed.version)
        if parsed.version is not None and cached.is_dir():
            return cached
        info = self.resolve(ref)
        target = cache_dir / info.name / str(info.version)
        if target.is_dir():
            return target
        with self._call(f"download {info.uri} into {cache_dir}"):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{info.version}.", suffix=".partial", dir=target.parent)
            try:
                fetched = self._fetch_artifacts(info, Path(tmp))
                if not (fetched / "config.json").is_file():
                    raise RegistryError(f"{info.uri} is not a model directory (no config.json)")
                try:
                    fetched.rename(target)
                except OSError:
                    if not target.is_dir():  # else: a concurrent download finished first
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _fetch_artifacts(self, info: VersionInfo, dst: Path) -> Path:
        # Not mlflow.artifacts.download_artifacts("models:/..."): MLflow 3 resolves models:/ URIs
        # against the *global* registry URI, ignoring the tracking URI passed to it.
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        client = self._client()
        source = client.get_model_version_download_uri(info.name, str(info.version))
        repo = get_artifact_repository(source, tracking_uri=self.tracking_uri)
        return Path(repo.download_artifacts("", str(dst)))

    # -- MLflow objects to plain data -----------------------------------------------------------

    def _search(self, filter_string: str) -> list[Any]:
        client, found, token = self._client(), [], None
        while True:
            page = client.search_model_versions(filter_string, page_token=token)
            found.extend(page)
            token = page.token
            if not token:
                return found

    def _aliases(self) -> dict[str, str]:
        model = _unless_missing(lambda: self._client().get_registered_model(self.registered_model))
        return {} if model is None else dict(model.aliases)

    def _run_metrics(self, run_id: str | None) -> dict[str, float]:
        run = _unless_missing(lambda: self._client().get_run(run_id)) if run_id else None
        return {} if run is None else dict(run.data.metrics)  # None: no run, or it was purged

    def _info(
        self, mv: Any, aliases: Sequence[str] | None = None, metrics: dict[str, float] | None = None
    ) -> VersionInfo:
        run_id = mv.run_id or None
        return VersionInfo(
            name=mv.name,
            version=int(mv.version),
            aliases=tuple(sorted(mv.aliases if aliases is None else aliases)),
            created=datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC),
            run_id=run_id,
            source=mv.source,
            tags=dict(mv.tags),
            metrics=self._run_metrics(run_id) if metrics is None else metrics,
        )


def _unless_missing(fetch: Callable[[], _T]) -> _T | None:
    """`fetch()`, or None where absence is an answer rather than an error."""
    from mlflow.exceptions import MlflowException

    try:
        return fetch()
    except MlflowException as e:
        if _is_missing(e):
            return None
        raise


def _is_missing(e: BaseException) -> bool:
    # MLflow reports a missing alias as INVALID_PARAMETER_VALUE, other misses as 404s.
    code = getattr(e, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "not found" in str(e)
    )


def _causes(e: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def versions_table(
    versions: Sequence[VersionInfo],
    metric_keys: Sequence[str],
    tag_keys: Sequence[str] = DEFAULT_TABLE_TAGS,
    title: str | None = None,
) -> Table:
    """`stillhouse registry list`: one row per version, newest first as given."""
    table = Table(title=title, caption=None if versions else "no versions registered")
    table.add_column("version", justify="right")
    table.add_column("aliases")
    table.add_column("created (UTC)")
    for key in metric_keys:
        table.add_column(key, justify="right")
    for key in tag_keys:
        table.add_column(key)
    for v in versions:
        aliases = ", ".join(f"[bold]{a}[/]" if a == "champion" else a for a in v.aliases)
        metrics = [number(v.metrics.get(k), ".4g", missing="-") for k in metric_keys]
        tags = [escape(v.tags.get(k, "-")) for k in tag_keys]
        table.add_row(
            str(v.version), aliases, v.created.strftime("%Y-%m-%d %H:%M"), *metrics, *tags
        )
    return table
