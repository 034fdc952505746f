"""Configuration: one YAML file parsed into typed pydantic models, environment overrides on top.

Lookup: `--config PATH`, else `$STILLHOUSE_CONFIG`, else `./stillhouse.yaml` if present, else the
embedded demo defaults (state in `./.stillhouse/`). An environment variable
`STILLHOUSE_<SECTION>__<FIELD>` overrides one field, e.g.

    STILLHOUSE_ENGINE__CPU_KVCACHE_SPACE_GIB=2
    STILLHOUSE_STATE_DIR=/var/lib/stillhouse
    STILLHOUSE_ENGINE__EXTRA_ARGS='["--enforce-eager"]'     # JSON for lists and maps

Secrets (API keys) are `SecretStr`: they print as `**********` and are never logged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from stillhouse.common.errors import ConfigError
from stillhouse.common.eval_settings import EvaluationSettings
from stillhouse.common.rollout_settings import RolloutSettings
from stillhouse.common.section import Section as _Section

ENV_PREFIX = "STILLHOUSE_"
CONFIG_ENV = "STILLHOUSE_CONFIG"
DEFAULT_CONFIG_FILE = "stillhouse.yaml"
API_KEYS_ENV = "STILLHOUSE_API_KEYS"
ADMIN_KEY_ENV = "STILLHOUSE_ADMIN_KEY"
GATEWAY_FD_ENV = "STILLHOUSE_GATEWAY_FD"  # the listening socket `up` hands the gateway
# Variables that share the prefix but are not config overrides: the config file's path, the
# gateway's secrets and its inherited socket (read by the gateway itself, never parsed into
# Settings).
NOT_OVERRIDES = frozenset({CONFIG_ENV, API_KEYS_ENV, ADMIN_KEY_ENV, GATEWAY_FD_ENV})


class EngineSettings(_Section):
    """How `serving` starts a vLLM OpenAI-compatible server."""

    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=1, le=65535, description="None picks a free port")
    max_model_len: int = Field(default=512, ge=16)
    max_logprobs: int = Field(default=20, ge=0, le=1000)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    enforce_eager: bool = False
    extra_args: tuple[str, ...] = ()
    ready_timeout_s: float = Field(default=600.0, gt=0)
    stop_grace_s: float = Field(default=15.0, ge=0)
    # vLLM CPU backend: GiB reserved for the KV cache, and which cores its OpenMP threads use.
    cpu_kvcache_space_gib: int = Field(default=1, ge=1)
    cpu_omp_threads_bind: str = "auto"
    api_key: SecretStr | None = None

    @property
    def key(self) -> str | None:
        """The engines' API key in clear (vLLM's --api-key), or None: they take any request."""
        return self.api_key.get_secret_value() if self.api_key is not None else None

    def auth_headers(self) -> dict[str, str]:
        """The headers a call to one of our engines carries."""
        return {"authorization": f"Bearer {self.key}"} if self.key else {}

    # A server `stillhouse serve` started that dies is restarted after restart_backoff_s,
    # doubled per failed try up to restart_backoff_max_s, at most restart_max_attempts times
    # in a row; supervise_interval_s is how often its process is looked at.
    supervise_interval_s: float = Field(default=1.0, gt=0)
    restart_backoff_s: float = Field(default=1.0, ge=0)
    restart_backoff_max_s: float = Field(default=60.0, ge=0)
    restart_max_attempts: int = Field(default=10, ge=1)
    # Environment variables a vLLM server inherits beyond the built-in allow-list (names, or
    # prefixes ending in `*`); nothing else of the starting process's environment, so the
    # gateway's own keys never reach an engine.
    env_allow: tuple[str, ...] = ()


class DemoSettings(_Section):
    """The embedded demo world: corpus size, model sizes and training budget."""

    # The CLI fills what the config leaves unset (the teacher, the prompts to distil and to
    # calibrate on) from the demo world. Off: every one of them must be configured.
    enabled: bool = True
    seed: int = 1234
    n_train: int = Field(default=10000, ge=18)
    n_val: int = Field(default=600, ge=18)
    n_test: int = Field(default=600, ge=18)
    vocab_size: int = Field(default=2048, ge=300, le=65536)
    judge_share: float = Field(default=0.3, ge=0, le=1)
    pairwise_share: float = Field(default=0.3, ge=0, le=1)
    teacher_epochs: float = Field(default=3.0, gt=0)
    teacher_hidden_size: int = Field(default=256, ge=64)
    teacher_layers: int = Field(default=4, ge=1)
    # Context length the demo models are built for; engine.max_model_len must not exceed it.
    max_positions: int = Field(default=512, ge=64)


class DataSettings(_Section):
    """Which prompts a re-distillation trains on."""

    # JSONL of prompts or chat messages; None: the demo corpus's train split.
    source: Path | None = None
    window_days: float | None = Field(default=7.0, gt=0)
    max_prompts: int = Field(default=4000, ge=10)
    heldout_share: float = Field(default=0.1, gt=0, lt=0.5)
    # A deliberately degraded student, to check that the rollout's gates catch one: every
    # training prompt gets another prompt's teacher answer (held-out pairs stay true, so the
    # run's own held-out numbers show the damage). Never on in production.
    shuffle_targets: bool = False


class TeacherSettings(_Section):
    """The teacher that produces targets: a model to serve with vLLM, or a running endpoint."""

    model: str | None = None  # a model directory; None: the demo teacher
    base_url: str | None = None  # an OpenAI-compatible server already running; None: start one
    served_name: str = "teacher"
    api_key: SecretStr | None = None
    targets: Literal["black-box", "grey-box", "white-box"] = "grey-box"
    top_k: int = Field(default=20, ge=1, le=1000)
    max_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    batch_size: int = Field(default=32, ge=1, le=1024)
    concurrency: int = Field(default=4, ge=1, le=256)
    timeout_s: float = Field(default=120.0, gt=0)
    retries: int = Field(default=3, ge=0, le=10)


class FilterSettings(_Section):
    """Rejection sampling of teacher outputs before training."""

    min_tokens: int = Field(default=2, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    drop_truncated: bool = True
    answer_format: Literal["triage"] | None = "triage"
    min_judge_score: int | None = Field(default=None, ge=1, le=5)


class StudentSettings(_Section):
    """The student: a fresh Llama of this shape, or warm-started from a model (champion)."""

    warm_start: str | None = None  # a model directory or models:/name@alias
    hidden_size: int = Field(default=128, ge=64)
    intermediate_size: int = Field(default=384, ge=1)
    num_layers: int = Field(default=2, ge=1)
    num_kv_heads: int | None = Field(default=None, ge=1)
    lora_rank: int | None = Field(default=None, ge=1, le=1024)  # 32-64 is usual for distillation
    lora_alpha: int = Field(default=64, ge=1)


class KdSettings(_Section):
    """loss = alpha * T^2 * divergence(teacher, student) + (1 - alpha) * CE(teacher tokens)."""

    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl"] = "forward_kl"
    alpha: float = Field(default=0.9, ge=0.0, le=1.0)
    temperature: float = Field(default=1.0, gt=0.0, le=20.0)
    beta: float = Field(default=0.5, ge=0.0, le=1.0)
    skew: float = Field(default=0.1, ge=0.0, le=1.0)


class TrainingSettings(_Section):
    epochs: int = Field(default=6, ge=1, le=1000)
    learning_rate: float = Field(default=3e-3, gt=0.0, le=1.0)
    warmup_ratio: float = Field(default=0.05, ge=0.0, lt=1.0)
    min_lr_ratio: float = Field(default=0.05, ge=0.0, le=1.0)
    weight_decay: float = Field(default=0.01, ge=0.0, le=1.0)
    batch_tokens: int = Field(default=4096, ge=64)
    grad_clip: float = Field(default=1.0, gt=0.0)
    patience: int = Field(default=2, ge=1)  # epochs without held-out KL improvement
    seed: int = 0


class RedistillSettings(_Section):
    data: DataSettings = DataSettings()
    teacher: TeacherSettings = TeacherSettings()
    filter: FilterSettings = FilterSettings()
    student: StudentSettings = StudentSettings()
    kd: KdSettings = KdSettings()
    training: TrainingSettings = TrainingSettings()
    # The demo also trains an SFT-only student (alpha = 0) and reports it beside the KD one.
    sft_baseline: bool = True
    evaluate_served: bool = True  # serve the student with vLLM for task metrics


class MlflowSettings(_Section):
    """Tracking and model registry. No URI: SQLite and an artifact folder under the state dir."""

    tracking_uri: str | None = None
    experiment: str = "stillhouse"
    registered_model: str = "stillhouse-student"


class ScheduleSettings(_Section):
    """When `stillhouse schedule` re-distills: a 5-field cron expression, evaluated in UTC."""

    cron: str = "0 2 * * 0"  # Sundays at 02:00 UTC


class EngineRef(_Section):
    """One model behind the gateway: started here (`model`: a directory or a registry reference
    such as `models:/stillhouse-student@champion`) or already running (`base_url`)."""

    model: str | None = None
    base_url: str | None = None
    served_name: str | None = None  # the name the engine answers to (default: its role)
    extra_args: tuple[str, ...] = ()
    # With `base_url`: the model that engine serves (e.g. models:/stillhouse-student/3), so the
    # traffic log names the model rather than the URL.
    model_uri: str | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> EngineRef:
        if (self.model is None) == (self.base_url is None):
            raise ValueError("set exactly one of `model` (start it here) or `base_url` (running)")
        if self.model_uri is not None and self.base_url is None:
            raise ValueError("model_uri names what a running engine (base_url) serves")
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        return self


class EnginesSettings(_Section):
    """Which models `stillhouse serve` runs. Unset roles mean the demo models."""

    teacher: EngineRef | None = None
    champion: EngineRef | None = None
    challenger: EngineRef | None = None


class AbSettings(_Section):
    """The sticky A/B split between champion and challenger (changeable at runtime via admin)."""

    challenger_share: float = Field(default=0.1, ge=0.0, le=1.0)
    seed: str = Field(default="stillhouse-ab", min_length=1)
    # Mirror phase: the share of champion-arm requests also sent, in the background, to the
    # challenger; no user sees its answer (traffic records `served_by: mirror`).
    mirror_share: float = Field(default=0.0, ge=0.0, le=1.0)
    # A challenger version tagged rolled back (its rollout failed) is not served, even while it
    # still holds the `challenger` alias; true serves it anyway (an operator's override).
    serve_rolled_back: bool = False
    # A challenger registry version serves users (a share above 0) only at a threshold
    # certified for it; until then it is started and mirrored but gets no users. True lets an
    # uncertified one take the share anyway (an operator's override).
    serve_uncertified: bool = False


class ConfidenceSettings(_Section):
    """When the teacher answers instead of the student: the student's confidence below
    `threshold`, from the first `hold_tokens` tokens of its answer."""

    enabled: bool = True
    signal: Literal["mean_logprob", "min_logprob", "quantile", "neg_mean_entropy"] = "mean_logprob"
    threshold: float = Field(default=-0.35, le=0.0)
    quantile: float = Field(default=0.1, gt=0.0, lt=1.0)
    hold_tokens: int = Field(default=8, ge=1, le=4096)
    top_k: int = Field(default=5, ge=1, le=20)


class FallbackSettings(_Section):
    """Failure handling: attempt timeouts, retries, a per-request deadline, circuit breakers,
    and the budget that protects the teacher. docs/gateway.md has what a client sees for each
    kind of failure."""

    # A non-streamed attempt may take attempt_timeout_s plus max_tokens / min_tokens_per_s
    # (a long healthy answer is not a failure); a streamed one must bring its first
    # `hold_tokens` within attempt_timeout_s and then never go quiet for stream_idle_timeout_s.
    attempt_timeout_s: float = Field(default=20.0, gt=0)
    min_tokens_per_s: float = Field(default=20.0, gt=0)
    stream_idle_timeout_s: float = Field(default=60.0, gt=0)
    deadline_s: float = Field(default=60.0, gt=0)
    # Retried on the same engine: connection errors only (a 5xx or a timeout is not replayed
    # on the engine that caused it), after retry_backoff_s, doubled each time, jittered.
    retries: int = Field(default=1, ge=0, le=10)
    retry_backoff_s: float = Field(default=0.05, ge=0, le=5)
    breaker_failures: int = Field(default=3, ge=1)
    breaker_cooldown_s: float = Field(default=10.0, gt=0)
    # The teacher answers at most this many user requests at once (fallbacks); the excess is
    # refused at once with 503 and Retry-After rather than queued. 0: no limit.
    teacher_max_concurrency: int = Field(default=32, ge=0)
    # All user requests in flight in this gateway process; beyond it, 503 and Retry-After.
    max_concurrency: int = Field(default=1024, ge=0)
    retry_after_s: int = Field(default=1, ge=1, le=3600)
    # The longest server-sent-event line an engine may send (20 log-probabilities per token of
    # an echoed long prompt is megabytes); longer breaks the stream as an engine failure.
    max_event_bytes: int = Field(default=16 << 20, ge=1024)


class ShadowSettings(_Section):
    """Off the hot path, the teacher scores a share of student answers (its log-probabilities
    of the student's tokens) so divergence can be estimated."""

    fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    queue_size: int = Field(default=256, ge=1)
    concurrency: int = Field(default=2, ge=1, le=64)
    top_k: int = Field(default=5, ge=0, le=20)
    timeout_s: float = Field(default=60.0, gt=0)
    # Mirrored challenger calls (gateway.ab.mirror_share): at most this many at once, this many
    # waiting; more are dropped and counted.
    mirror_concurrency: int = Field(default=2, ge=1, le=64)
    mirror_queue_size: int = Field(default=64, ge=1)


class TrafficLogSettings(_Section):
    """The durable traffic log (SQLite, WAL). `group`: committed every `flush_interval_ms`, off
    the hot path; `strict`: a response is sent only after its record is committed."""

    path: Path | None = None  # default: <state_dir>/traffic.db
    flush_interval_ms: int = Field(default=200, ge=1, le=10_000)
    sync: Literal["group", "strict"] = "group"
    # Prompts and answers are what the weekly re-distillation trains on, so they are kept, for
    # `retention_days` (0: forever); off, the log keeps routing, scores and counts only.
    log_prompts: bool = True
    retention_days: float = Field(default=30.0, ge=0.0)
    # What may wait for the writer; past either bound a record is dropped (and counted).
    max_pending_records: int = Field(default=100_000, ge=1)
    max_pending_bytes: int = Field(default=64 << 20, ge=1 << 16)
    # Strict mode: how long a response waits for its record's commit before it is refused.
    strict_timeout_s: float = Field(default=5.0, gt=0.0)
    # The secret that keys the user hash (HMAC-SHA256 of the user id), from this environment
    # variable; unset, a random key kept in <state_dir>/secrets/user-hash.key (0600). Gateways
    # sharing one traffic store must share the key, or their users do not line up.
    user_hash_key_env: str = "STILLHOUSE_USER_HASH_KEY"


class GatewaySettings(_Section):
    """The OpenAI-compatible gateway. Client keys come from the environment variable named by
    `api_keys_env` (comma-separated), the admin key from `admin_key_env`; never from YAML."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model_name: str = Field(default="stillhouse", min_length=1)
    api_keys_env: str = API_KEYS_ENV
    admin_key_env: str = ADMIN_KEY_ENV
    # The admin API (/admin/*) on a port of its own (e.g. 127.0.0.1:8001, or a port only the
    # controller's NetworkPolicy reaches); the client port then answers 404 there. None: one port.
    admin_port: int | None = Field(default=None, ge=0, le=65535)
    admin_host: str | None = None  # default: `host`
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_tokens_limit: int = Field(default=4096, ge=1)
    engines: EnginesSettings = EnginesSettings()
    # How often `stillhouse serve` asks the registry where its aliases point (hot swap) and
    # for the served versions' calibrated thresholds; 0 turns the polling off.
    watch_interval_s: float = Field(default=10.0, ge=0.0)
    # Downloaded versions kept per registered model in <state_dir>/cache/models after a swap:
    # the newest this many, and every one still served (older ones are deleted).
    model_cache_keep: int = Field(default=3, ge=1)
    ab: AbSettings = AbSettings()
    confidence: ConfidenceSettings = ConfidenceSettings()
    fallback: FallbackSettings = FallbackSettings()
    shadow: ShadowSettings = ShadowSettings()
    traffic_log: TrafficLogSettings = TrafficLogSettings()


class Settings(_Section):
    state_dir: Path = Path(".stillhouse")
    engine: EngineSettings = EngineSettings()
    demo: DemoSettings = DemoSettings()
    mlflow: MlflowSettings = MlflowSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    redistill: RedistillSettings = RedistillSettings()
    gateway: GatewaySettings = GatewaySettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    rollout: RolloutSettings = RolloutSettings()

    @field_validator("state_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @property
    def demo_dir(self) -> Path:
        return self.state_dir / "demo"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def tracking_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return f"sqlite:///{(self.state_dir / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> Path:
        """Where the default (SQLite) backend keeps run artifacts and model files."""
        return (self.state_dir / "mlartifacts").resolve()

    @property
    def eval_db_path(self) -> Path:
        """Judgments, drift references and evaluation results (SQLite)."""
        return self.state_dir / "eval.db"

    @property
    def metrics_dir(self) -> Path:
        """Batch jobs' Prometheus gauges (text exposition files), served by the controller."""
        return self.state_dir / "metrics"

    @property
    def controller_dir(self) -> Path:
        """The rollout controller's state (SQLite) and single-instance lock."""
        return self.state_dir / "controller"

    @property
    def traffic_log_path(self) -> Path:
        return self.gateway.traffic_log.path or self.state_dir / "traffic.db"


def _env_value(raw: str) -> Any:
    # Lists and maps come as JSON; everything else stays a string for pydantic to coerce.
    stripped = raw.strip()
    if stripped[:1] in "[{":
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return raw
    return raw


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Nested overrides from `STILLHOUSE_A__B=value` variables (except `NOT_OVERRIDES`)."""
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_OVERRIDES:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config error: {name} conflicts with another override")
        node[path[-1]] = _env_value(raw)
    return tree


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"config error in {source}: {field}: {first['msg']}{more}"


def resolve_config_path(explicit: Path | None, environ: Mapping[str, str]) -> Path | None:
    if explicit is not None:
        return explicit
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from `path` (or the lookup above) with environment overrides applied."""
    environ = os.environ if environ is None else environ
    path = resolve_config_path(path, environ)
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config error: file not found: {path}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config error in {path}{where}: not valid YAML") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config error in {path}: the top level must be a mapping")
        data = loaded or {}
    overrides = env_overrides(environ)
    if overrides:
        source += " + STILLHOUSE_* environment"
    try:
        return Settings.model_validate(_deep_merge(data, overrides))
    except ValidationError as e:
        raise ConfigError(_one_line(e, source)) from None
