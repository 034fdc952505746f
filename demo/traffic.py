"""Synthetic production traffic for the demo: tickets from many users sent through the gateway
with the official `openai` client, a bounded number at a time, as a real client would.

Each ticket goes out as a chat request from one of `n_users` users (the `user` field is what
the gateway's sticky A/B assignment hashes), half of them streamed. The gateway's routing
headers say which arm each user got and who answered; the tally is what the demo prints.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from openai import APIError, AsyncOpenAI

from stillhouse.common.prompts import triage_user_message
from stillhouse.demo.corpus import Ticket

MAX_TOKENS = 48


@dataclass
class TrafficTally:
    sent: int = 0
    failed: int = 0
    by_arm: Counter[str] = field(default_factory=Counter)
    by_served: Counter[str] = field(default_factory=Counter)
    fallbacks: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


async def _one(
    client: AsyncOpenAI, model: str, ticket: Ticket, user: str, stream: bool, tally: TrafficTally
) -> None:
    messages = [{"role": "user", "content": triage_user_message(ticket.text)}]
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            user=user,
            stream=stream,
        )
        response = raw.parse()
        if stream:
            async for _ in response:  # type: ignore[union-attr]
                pass
    except APIError as e:
        tally.failed += 1
        if len(tally.errors) < 3:
            tally.errors.append(str(e).splitlines()[0][:200])
        return
    headers = raw.headers
    tally.by_arm[headers.get("x-stillhouse-arm", "?")] += 1
    tally.by_served[headers.get("x-stillhouse-served-by", "?")] += 1
    reason = headers.get("x-stillhouse-fallback")
    if reason and reason != "none":
        tally.fallbacks[reason] += 1


async def drive_tickets(
    base_url: str,
    api_key: str,
    model: str,
    tickets: Sequence[Ticket],
    *,
    n_users: int = 150,
    concurrency: int = 8,
    on_done: Callable[[int], None] | None = None,
    first_index: int = 0,
    stop: Callable[[], bool] | None = None,
) -> TrafficTally:
    """Send every ticket once (or until `stop()`); ticket i comes from user
    `demo-user-((first_index + i) mod n_users)`."""
    tally = TrafficTally()
    loop = asyncio.get_running_loop()
    started = loop.time()
    queue: asyncio.Queue[tuple[int, Ticket]] = asyncio.Queue()
    for item in enumerate(tickets):
        queue.put_nowait(item)
    async with AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120) as c:

        async def worker() -> None:
            while not queue.empty() and not (stop is not None and stop()):
                i, ticket = queue.get_nowait()
                user = f"demo-user-{(first_index + i) % n_users}"
                await _one(c, model, ticket, user, i % 2 == 1, tally)
                tally.sent += 1
                if on_done is not None:
                    on_done(tally.sent)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    tally.seconds = loop.time() - started
    return tally


class TrafficLoop:
    """Tickets sent round and round in a background thread until `stop()`: the steady traffic
    a rollout needs while the controller walks the challenger through its steps."""

    def __init__(
        self,
        base_url: str,
        tickets: Sequence[Ticket],
        *,
        n_users: int,
        concurrency: int,
        tally: TrafficTally | None = None,  # carry on counting from an earlier loop
    ) -> None:
        import threading

        self.base_url = base_url
        self.tickets = list(tickets)
        self.n_users = n_users
        self.concurrency = concurrency
        self.total = tally or TrafficTally()
        self._sent = self.total.sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> TrafficTally:
        self._stop.set()
        self._thread.join(timeout=60)
        return self.total

    def _run(self) -> None:
        sent, chunk = self._sent, 200
        while not self._stop.is_set():
            start = sent % len(self.tickets)
            part = self.tickets[start : start + chunk]
            tally = asyncio.run(
                drive_tickets(
                    self.base_url,
                    "unused",
                    "stillhouse",
                    part,
                    n_users=self.n_users,
                    concurrency=self.concurrency,
                    first_index=sent,
                    stop=self._stop.is_set,
                )
            )
            sent += len(part)
            self._merge(tally)

    def _merge(self, tally: TrafficTally) -> None:
        t = self.total
        t.sent += tally.sent
        t.failed += tally.failed
        t.seconds += tally.seconds
        t.by_arm.update(tally.by_arm)
        t.by_served.update(tally.by_served)
        t.fallbacks.update(tally.fallbacks)
        t.errors.extend(tally.errors[: max(0, 3 - len(t.errors))])
