"""The LLM judge: single-answer grades and order-swapped pairwise comparisons from any
OpenAI-compatible endpoint, through the `openai` client.

    async with Judge(config, DemoJudgeTemplate()) as judge:
        grades = await judge.grade_many([(ticket_text, answer), ...])
        pairs = await judge.compare_many([(ticket_text, student, teacher), ...])

Every item comes back in input order with a status (ok / unparseable / error); a refused key
or an unknown model raises `JudgeError` at once. Start a vLLM judge with `judge_engine_args`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import openai

from stillhouse.common.errors import ConfigError, StillhouseError
from stillhouse.eval.judge_cache import JudgeCache, cache_key
from stillhouse.eval.judge_templates import JudgeTemplate, PairwiseVerdict, SingleVerdict

Status = Literal["ok", "unparseable", "error"]
Winner = Literal["a", "b", "tie"]
T = TypeVar("T")

# vLLM 0.32 reads `disable_any_whitespace` only from the server's StructuredOutputsConfig (the
# xgrammar and guidance backends ignore the per-request field of the same name), and accepts it
# only with an explicit xgrammar or guidance backend ("auto" fails validation at start-up).
STRUCTURED_OUTPUTS_CONFIG: dict[str, Any] = {"backend": "xgrammar", "disable_any_whitespace": True}
_SNIPPET_CHARS = 80
_MESSAGE_CHARS = 200


def judge_engine_args(template: JudgeTemplate) -> tuple[str, ...]:
    """Extra vLLM server arguments for an engine that serves as judge with `template`.

    Templates for generic judges (`compact_json`) get whitespace-free JSON forced, so a weak
    model cannot pad a constrained reply with whitespace until max_tokens runs out. The demo
    template gets nothing: its model learned spaced JSON and judges worse when it is forbidden.
    """
    if not template.compact_json:
        return ()
    return ("--structured-outputs-config", json.dumps(STRUCTURED_OUTPUTS_CONFIG))


class JudgeError(StillhouseError):
    """The judge cannot work as configured (a refused key, an unknown model, a missing key
    variable); one readable line, never the key."""


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge is and how hard to push it. The API key is never here: `api_key_env`
    names the environment variable that holds it (None: an endpoint without a key)."""

    base_url: str
    model: str
    api_key_env: str | None = None
    concurrency: int = 4
    timeout_s: float = 60.0  # per call
    max_parse_retries: int = 2  # further replies asked for after a malformed one
    max_transport_retries: int = 2  # per call, on timeouts, connection errors, 408/409/429/5xx
    retry_backoff_s: float = 0.5  # doubled per transport retry, capped at 8 s
    max_tokens: int = 256
    temperature: float = 0.0
    # A greedy judge repeats a malformed reply word for word: retries sample instead.
    retry_temperature: float = 0.7
    structured_output: bool = True  # send response_format json_schema (vLLM, OpenAI support it)
    cache_path: Path | None = None

    def __post_init__(self) -> None:
        problems = [
            msg
            for bad, msg in (
                (not self.base_url, "base_url must not be empty"),
                (not self.model, "model must not be empty"),
                (self.api_key_env == "", "api_key_env must be a variable name or None"),
                (not 1 <= self.concurrency <= 1024, "concurrency must be in 1..1024"),
                (not self.timeout_s > 0, "timeout_s must be > 0"),
                (not 0 <= self.max_parse_retries <= 10, "max_parse_retries must be in 0..10"),
                (not 0 <= self.max_transport_retries <= 10, "max_transport_retries: 0..10"),
                (not self.retry_backoff_s >= 0, "retry_backoff_s must be >= 0"),
                (not self.max_tokens >= 1, "max_tokens must be >= 1"),
                (not 0 <= self.temperature <= 2, "temperature must be in 0..2"),
                (not 0 <= self.retry_temperature <= 2, "retry_temperature must be in 0..2"),
            )
            if bad
        ]
        if problems:
            raise ConfigError("judge config: " + "; ".join(problems))


@dataclass(frozen=True)
class SingleJudgment:
    key: str  # the cache key of (model, template version, question, answer)
    status: Status
    score: int | None  # 1..5 when status is "ok"
    reason: str | None
    attempts: int  # judge replies asked for (0 when cached)
    cached: bool
    error: str | None = None  # why, when status is not "ok"


@dataclass(frozen=True)
class PairwiseJudgment:
    """Both orders asked; `outcome` is "a" or "b" only when both orders agree, else "tie"."""

    key: str  # the cache key of the (a, b) order
    status: Status
    outcome: Winner | None  # None unless status is "ok"
    first: str | None  # the winner said with the answers shown as (a, b)
    second: str | None  # the winner said with the answers shown as (b, a), mapped back to a/b
    first_reason: str | None
    second_reason: str | None  # in the swapped order's labels (its "a" is answer b)
    attempts: int
    cached: bool  # both orders came from the cache
    error: str | None = None


@dataclass(frozen=True)
class JudgeStats:
    """Counters since the judge was made. `unparseable` and `errors` count judgments (a
    pairwise one counts once, whichever order failed); the rest count calls or verdicts."""

    judgments: int = 0
    ok: int = 0
    unparseable: int = 0
    errors: int = 0
    calls: int = 0  # HTTP requests sent, retries included
    timeouts: int = 0  # calls that hit timeout_s
    cache_hits: int = 0  # verdicts read from the cache (a pairwise judgment has two)
    parse_retries: int = 0
    transport_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class JudgeRun:
    single: list[SingleJudgment]
    pairwise: list[PairwiseJudgment]
    stats: JudgeStats


# ---- pure decisions -----------------------------------------------------------------------


def swap_winner(winner: str) -> str:
    """A winner said about the swapped order (b, a), in the original order's labels."""
    return {"a": "b", "b": "a"}.get(winner, winner)


def pairwise_outcome(first: str, second: str) -> Winner:
    """A win only when both orders name the same answer (both in the original labels); any
    disagreement — position bias, a tie on either side — is a tie."""
    if first == second and first in ("a", "b"):
        return "a" if first == "a" else "b"
    return "tie"


def combine_status(*statuses: Status) -> Status:
    """An endpoint failure outranks an unparseable reply, which outranks success."""
    for status in ("error", "unparseable"):
        if status in statuses:
            return status  # type: ignore[return-value]
    return "ok"


def status_action(code: int) -> Literal["config", "retry", "fail"]:
    """What an HTTP error means for the run: the caller's configuration (stop everything), a
    transient failure (retry), or this item's failure (record it)."""
    if code in (401, 403, 404):
        return "config"
    if code in (408, 409, 429) or code >= 500:
        return "retry"
    return "fail"


def config_error_message(code: int, base_url: str, model: str, api_key_env: str | None) -> str:
    """One line for a configuration failure. The server's own message is left out: hosted APIs
    quote part of the key in it."""
    if code == 401:
        where = f"from ${api_key_env}" if api_key_env else "none configured (set api_key_env)"
        return f"judge endpoint refused the key (401) at {base_url}; key: {where}"
    if code == 403:
        return f"judge endpoint denied access (403) at {base_url}"
    return f"judge endpoint has no model {model!r} or no chat completions API (404) at {base_url}"


def backoff_s(retry: int, base: float) -> float:
    return min(8.0, base * 2 ** (retry - 1))


def snippet(text: str | None, limit: int = _SNIPPET_CHARS) -> str:
    if text is None:
        return "(no content)"
    return text if len(text) <= limit else text[:limit] + "..."


# ---- I/O ----------------------------------------------------------------------------------


class _EndpointFailed(Exception):
    pass


@dataclass(frozen=True)
class _Fetched:
    status: Status
    verdict: dict[str, Any] | None
    attempts: int
    cached: bool
    error: str | None


def resolve_api_key(api_key_env: str | None, environ: Mapping[str, str]) -> str:
    if api_key_env is None:
        return "EMPTY"  # vLLM without --api-key accepts any; the openai client wants one
    key = environ.get(api_key_env, "")
    if not key:
        raise JudgeError(f"the judge's API key variable ${api_key_env} is not set")
    return key


async def gather_or_cancel(aws: Sequence[Awaitable[T]]) -> list[T]:
    """Results in order; on the first exception the others are cancelled (not left running
    against an endpoint that just refused the key) and the exception propagates."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class Judge:
    """An async judge bound to one endpoint, one template and one event loop."""

    def __init__(
        self,
        config: JudgeConfig,
        template: JudgeTemplate,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.template = template
        self._version = template.version
        self._key = resolve_api_key(config.api_key_env, os.environ if environ is None else environ)
        self._cache = JudgeCache(config.cache_path) if config.cache_path is not None else None
        self._client = openai.AsyncOpenAI(
            base_url=config.base_url,
            api_key=self._key,
            timeout=config.timeout_s,
            max_retries=0,  # retried here, so retries are bounded and counted in one place
        )
        self._sem = asyncio.Semaphore(config.concurrency)
        self._counts: Counter[str] = Counter()
        self._fatal: JudgeError | None = None  # once the endpoint refused us, send nothing more

    @property
    def stats(self) -> JudgeStats:
        return JudgeStats(**{f.name: self._counts[f.name] for f in fields(JudgeStats)})

    async def grade(self, question: str, answer: str) -> SingleJudgment:
        key = cache_key(self.config.model, self._version, "single", (question, answer))
        got = await self._verdict(
            "single",
            key,
            self.template.single_messages(question, answer),
            self.template.single_schema,
            self.template.parse_single,
        )
        self._count_judgment(got.status)
        verdict = got.verdict or {}
        return SingleJudgment(
            key,
            got.status,
            verdict.get("score"),
            verdict.get("reason"),
            got.attempts,
            got.cached,
            got.error,
        )

    async def compare(self, question: str, answer_a: str, answer_b: str) -> PairwiseJudgment:
        """Ask (a, b) and (b, a) concurrently; a win needs both orders to agree. Two identical
        answers are a tie without a call (both orders would be one prompt, one cache entry)."""
        t = self.template
        orders = ((answer_a, answer_b), (answer_b, answer_a))
        keys = [
            cache_key(self.config.model, self._version, "pairwise", (question, x, y))
            for x, y in orders
        ]
        if answer_a == answer_b:
            self._count_judgment("ok")
            return PairwiseJudgment(
                key=keys[0],
                status="ok",
                outcome="tie",
                first="tie",
                second="tie",
                first_reason="identical answers",
                second_reason="identical answers",
                attempts=0,
                cached=False,
            )
        first, second = await gather_or_cancel(
            [
                self._verdict(
                    "pairwise",
                    k,
                    t.pairwise_messages(question, x, y),
                    t.pairwise_schema,
                    t.parse_pairwise,
                )
                for k, (x, y) in zip(keys, orders, strict=True)
            ]
        )
        status = combine_status(first.status, second.status)
        self._count_judgment(status)
        w1 = first.verdict["winner"] if first.verdict else None
        w2 = swap_winner(second.verdict["winner"]) if second.verdict else None
        outcome = pairwise_outcome(w1, w2) if status == "ok" and w1 and w2 else None
        errors = [
            f"{name}: {f.error}" for name, f in (("(a,b)", first), ("(b,a)", second)) if f.error
        ]
        return PairwiseJudgment(
            key=keys[0],
            status=status,
            outcome=outcome,
            first=w1,
            second=w2,
            first_reason=first.verdict["reason"] if first.verdict else None,
            second_reason=second.verdict["reason"] if second.verdict else None,
            attempts=first.attempts + second.attempts,
            cached=first.cached and second.cached,
            error="; ".join(errors) or None,
        )

    async def grade_many(
        self,
        items: Sequence[tuple[str, str]],
        on_done: Callable[[int, SingleJudgment], None] | None = None,
    ) -> list[SingleJudgment]:
        """(question, answer) pairs, judged concurrently (at most `concurrency` calls in
        flight), returned in input order; `on_done(index, judgment)` as each finishes."""
        return await gather_or_cancel(
            [_reporting(i, self.grade(q, a), on_done) for i, (q, a) in enumerate(items)]
        )

    async def compare_many(
        self,
        items: Sequence[tuple[str, str, str]],
        on_done: Callable[[int, PairwiseJudgment], None] | None = None,
    ) -> list[PairwiseJudgment]:
        """(question, answer_a, answer_b) triples; as `grade_many`."""
        return await gather_or_cancel(
            [_reporting(i, self.compare(q, a, b), on_done) for i, (q, a, b) in enumerate(items)]
        )

    async def aclose(self) -> None:
        await self._client.close()
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    async def __aenter__(self) -> Judge:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _count_judgment(self, status: Status) -> None:
        self._counts["judgments"] += 1
        self._counts[{"ok": "ok", "unparseable": "unparseable", "error": "errors"}[status]] += 1

    async def _verdict(
        self,
        mode: str,
        key: str,
        messages: list[dict[str, str]],
        schema: dict[str, Any],
        parse: Callable[[str | None], SingleVerdict | PairwiseVerdict | None],
    ) -> _Fetched:
        """One verdict: from the cache, or asked up to `max_parse_retries + 1` times."""
        if self._cache is not None and (row := self._cache.get(key)) is not None:
            verdict = parse(json.dumps(row))  # re-checked: a stale row is asked again
            if verdict is not None:
                self._counts["cache_hits"] += 1
                return _Fetched("ok", asdict(verdict), 0, True, None)
        last: str | None = None
        tries = self.config.max_parse_retries + 1
        for attempt in range(tries):
            if attempt:
                self._counts["parse_retries"] += 1
            temperature = self.config.temperature if attempt == 0 else self.config.retry_temperature
            try:
                last = await self._call(mode, messages, schema, temperature)
            except _EndpointFailed as e:
                return _Fetched("error", None, attempt + 1, False, str(e))
            verdict = parse(last)
            if verdict is not None:
                if self._cache is not None:
                    self._cache.put(key, self.config.model, self._version, mode, asdict(verdict))
                return _Fetched("ok", asdict(verdict), attempt + 1, False, None)
        error = f"no valid verdict in {tries} replies; last: {snippet(last)!r}"
        return _Fetched("unparseable", None, tries, False, error)

    async def _call(
        self, mode: str, messages: list[dict[str, str]], schema: dict[str, Any], temperature: float
    ) -> str | None:
        """One reply's text, with bounded transport retries. Foreign errors stop here: they
        become `_EndpointFailed` (this item) or `JudgeError` (the whole run)."""
        cfg = self.config
        kwargs: dict[str, Any] = {
            "model": cfg.model,
            "messages": messages,
            "max_completion_tokens": cfg.max_tokens,
            "temperature": temperature,
        }
        if cfg.structured_output:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": f"judge_{mode}", "schema": schema, "strict": True},
            }
        failure = "no attempt made"
        for retry in range(cfg.max_transport_retries + 1):
            if retry:
                self._counts["transport_retries"] += 1
                await asyncio.sleep(backoff_s(retry, cfg.retry_backoff_s))
            try:
                async with self._sem:
                    if self._fatal is not None:
                        raise JudgeError(str(self._fatal))
                    self._counts["calls"] += 1
                    response = await self._client.chat.completions.create(**kwargs)
            except openai.APITimeoutError:
                self._counts["timeouts"] += 1
                failure = f"timed out after {cfg.timeout_s:g} s"
                continue
            except openai.APIConnectionError as e:
                failure = f"connection failed: {self._scrub(str(e))}"
                continue
            except openai.APIStatusError as e:
                action = status_action(e.status_code)
                if action == "config":
                    message = config_error_message(
                        e.status_code, cfg.base_url, cfg.model, cfg.api_key_env
                    )
                    self._fatal = JudgeError(message)
                    raise self._fatal from None
                failure = f"HTTP {e.status_code}: {self._scrub(_error_text(e))}"
                if action == "retry":
                    continue
                raise _EndpointFailed(failure) from None
            except openai.OpenAIError as e:  # e.g. a response body that is not the API's
                raise _EndpointFailed(f"bad response: {self._scrub(str(e))}") from None
            if response.usage is not None:
                self._counts["prompt_tokens"] += response.usage.prompt_tokens or 0
                self._counts["completion_tokens"] += response.usage.completion_tokens or 0
            return response.choices[0].message.content if response.choices else None
        raise _EndpointFailed(failure)

    def _scrub(self, text: str) -> str:
        text = " ".join(text.split())[:_MESSAGE_CHARS]
        return text.replace(self._key, "***") if len(self._key) >= 4 else text


def _error_text(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(body.get("message"), str):
            return body["message"]
    return e.message


async def _reporting(index: int, aw: Awaitable[T], on_done: Callable[[int, T], None] | None) -> T:
    result = await aw
    if on_done is not None:
        on_done(index, result)
    return result


def run_judgments(
    config: JudgeConfig,
    template: JudgeTemplate,
    single_items: Sequence[tuple[str, str]] = (),
    pairwise_items: Sequence[tuple[str, str, str]] = (),
    environ: Mapping[str, str] | None = None,
) -> JudgeRun:
    """The synchronous entry for CLI commands: one event loop, both kinds concurrently."""

    async def main() -> JudgeRun:
        async with Judge(config, template, environ=environ) as judge:
            single, pairwise = await gather_or_cancel(
                [judge.grade_many(single_items), judge.compare_many(pairwise_items)]
            )
            return JudgeRun(single, pairwise, judge.stats)  # type: ignore[arg-type]

    return asyncio.run(main())
