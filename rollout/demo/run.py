"""`make demo`: build the demo world, serve the teacher on vLLM, ask it real tickets.

    stillhouse demo run

Prints each answer next to the ground truth with the first answer tokens' log-probabilities
(the signal the gateway's confidence fallback reads), the teacher's test-split accuracy as
served by vLLM, and stops the server, leaving no process behind.
"""

from __future__ import annotations

import math

from openai import OpenAI
from rich.console import Console
from rich.table import Table

from stillhouse.common.config import Settings
from stillhouse.common.prompts import parse_triage_answer, triage_user_message
from stillhouse.rollout.demo.build import (
    DemoWorld,
    build_demo_world,
    evaluate_teacher,
)
from stillhouse.rollout.demo.corpus import Ticket
from stillhouse.rollout.demo.report import print_build_summary
from stillhouse.serving.engine import EngineSpec, VllmEngine

SHOWN_TOKENS = 8


def pick_showcase(tickets: list[Ticket], n_easy: int = 2, n_hard: int = 3) -> list[Ticket]:
    """A few easy tickets and one of each hard kind, so the demo shows where confidence drops."""
    easy = [t for t in tickets if not t.hard][:n_easy]
    hard: list[Ticket] = []
    for tag in ("two_issue", "buried", "typos", "rare_phrase"):
        hit = next((t for t in tickets if tag in t.tags and t not in hard), None)
        if hit is not None and len(hard) < n_hard:
            hard.append(hit)
    return easy + hard


def _logprob_table(content: list) -> Table:
    table = Table(show_header=True, box=None, padding=(0, 1))
    table.add_column("token")
    table.add_column("p", justify="right")
    table.add_column("runner-up")
    for item in content[:SHOWN_TOKENS]:
        runner = next((a for a in item.top_logprobs if a.token != item.token), None)
        table.add_row(
            repr(item.token),
            f"{math.exp(item.logprob):.3f}",
            f"{runner.token!r} {math.exp(runner.logprob):.3f}" if runner else "",
        )
    return table


def ask_tickets(client: OpenAI, model: str, tickets: list[Ticket], console: Console) -> None:
    for ticket in tickets:
        response = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": triage_user_message(ticket.text)}],
            max_tokens=48,
            temperature=0.0,
            logprobs=True,
            top_logprobs=3,
        )
        choice = response.choices[0]
        text = choice.message.content or ""
        answer = parse_triage_answer(text)
        right = answer is not None and (answer.category, answer.priority) == (
            ticket.category,
            ticket.priority,
        )
        content = choice.logprobs.content if choice.logprobs else []
        mean_lp = sum(c.logprob for c in content) / max(1, len(content))
        tags = ", ".join(ticket.tags) or "easy"
        console.rule(f"[bold]{ticket.id}[/] ({tags})")
        console.print(f"[dim]ticket:[/] {ticket.text}", markup=True, highlight=False)
        console.print(f"[dim]truth:[/]  category: {ticket.category}, priority: {ticket.priority}")
        console.print(f"[dim]answer:[/] {text.strip()!s}", highlight=False)
        console.print(
            f"{'[green]correct[/]' if right else '[red]wrong[/]'}; "
            f"{response.usage.completion_tokens} tokens, mean token log-prob {mean_lp:.3f}"
        )
        console.print(_logprob_table(content))


def run_demo(settings: Settings, console: Console) -> DemoWorld:
    world = build_demo_world(settings, console=console)
    engine = VllmEngine(
        EngineSpec(world.teacher_dir, "teacher"), settings.engine, settings.logs_dir
    )
    try:
        status = f"starting vLLM (CPU) for the teacher, about a minute; log: {engine.log_path}"
        with console.status(status):
            engine.start()
            engine.wait_ready()
        console.print(f"teacher served by vLLM at {engine.base_url} (pid {engine.pid})")
        client = OpenAI(base_url=engine.base_url, api_key="unused", max_retries=2, timeout=120)
        ask_tickets(client, "teacher", pick_showcase(world.split("test")), console)
        console.rule("[bold]teacher quality")
        if "teacher_eval" not in world.manifest:
            evaluate_teacher(world, engine.base_url, "teacher", console)
        print_build_summary(world, console)
    finally:
        engine.stop()
    console.print("vLLM server stopped.")
    return world
