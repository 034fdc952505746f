"""One MLflow run per job: params, metrics per step, artifacts, and an honest end status.

    with RunTracker(registry, "stillhouse").run("redistill-2026-11-24", tags) as run:
        run.log_params(flatten(config))
        run.log_metrics({"heldout_kl": 0.12}, step=1)

Leaving the block normally ends the run FINISHED; an exception ends it FAILED, Ctrl-C KILLED,
so an interrupted job is visible as such and nothing downstream mistakes it for a result.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from stillhouse.common.registry import RegistryClient

MAX_PARAM_VALUE = 6000  # MLflow's limit on one param value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: nested config as MLflow params."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            flat[name] = text[:MAX_PARAM_VALUE]
    return flat


class ActiveRun:
    def __init__(self, registry: RegistryClient, run_id: str) -> None:
        self.registry = registry
        self.run_id = run_id

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        with self.registry.session("log params") as client:
            for start in range(0, len(items), 100):  # MLflow takes at most 100 per batch
                client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]  # no NaN
        with self.registry.session("log metrics") as client:
            client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        with self.registry.session("set run tags") as client:
            client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        with self.registry.session(f"log artifact {path.name}") as client:
            client.log_artifact(self.run_id, str(path), artifact_path)

    def log_table(self, rows: Sequence[Mapping[str, Any]], name: str) -> None:
        """Rows as an MLflow table artifact (shown in the run's artifact view); `name` ends in
        .json. Columns are the union of the rows' keys, missing cells None."""
        columns: dict[str, list[Any]] = {}
        for row in rows:
            for key in row:
                columns.setdefault(key, [])
        for row in rows:
            for key, values in columns.items():
                values.append(row.get(key))
        with self.registry.session(f"log table {name}") as client:
            client.log_table(self.run_id, columns, name)

    def log_json(self, obj: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
            self.log_artifact(path)


class RunTracker:
    def __init__(self, registry: RegistryClient, experiment: str) -> None:
        self.registry = registry
        self.experiment = experiment

    @contextlib.contextmanager
    def run(self, name: str, tags: Mapping[str, str] | None = None) -> Iterator[ActiveRun]:
        experiment_id = self.registry.ensure_experiment(self.experiment)
        with self.registry.session("start an MLflow run") as client:
            run_id = client.create_run(
                experiment_id, run_name=name, tags=dict(tags or {})
            ).info.run_id
        status = "FAILED"
        try:
            yield ActiveRun(self.registry, run_id)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            with self.registry.session("end the MLflow run") as client:
                client.set_terminated(run_id, status)
