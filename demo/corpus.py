"""Synthetic support-ticket triage corpus: the demo world's ground truth.

Every ticket is generated from a seed, so its category and priority are known exactly and any
quality number downstream can be checked. The corpus is built so that one keyword does not
solve it: distractor sentences mention other categories' words, a negation flips a priority
word ("this is not urgent"), two-issue tickets need a cue to find the primary one, rare
paraphrases appear only a few times in training, long tickets bury the key sentence between
filler, and typos corrupt words. Those hard tickets are tagged (`tags`) so that evaluation can
report the hard slice on its own.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

CATEGORIES: tuple[str, ...] = (
    "billing",
    "shipping",
    "account",
    "technical",
    "returns",
    "cancellation",
)
PRIORITIES: tuple[str, ...] = ("low", "medium", "high")

# How a customer states the problem. "common" phrasings dominate training; "rare" ones are
# seen only a handful of times, which is where a small student falls behind its teacher.
ISSUES: dict[str, dict[str, tuple[str, ...]]] = {
    "billing": {
        "common": (
            "i was charged twice for {order}",
            "my invoice for {order} shows the wrong amount",
            "there is a charge on my card that i do not recognize",
            "the price i paid for {order} is higher than the one on the website",
            "my payment for {order} failed but the money left my bank",
            "i was billed for a subscription fee i never agreed to",
            "the discount code was not applied to my bill for {order}",
        ),
        "rare": (
            "your system debited my card a second time for {order}",
            "the statement lists a fee that nobody explained to me",
            "i see two identical transactions on my credit card",
        ),
    },
    "shipping": {
        "common": (
            "my package for {order} has not arrived yet",
            "the tracking number for {order} does not work",
            "the courier says {order} was delivered but i never got it",
            "{order} is stuck in transit for a week",
            "the delivery address on {order} is wrong",
            "my parcel arrived at the wrong house",
            "the shipment for {order} is late again",
        ),
        "rare": (
            "the box for {order} never made it to my door",
            "the parcel service keeps bouncing {order} between depots",
            "nobody can tell me where my parcel currently is",
        ),
    },
    "account": {
        "common": (
            "i cannot log in to my account",
            "the password reset email never arrives",
            "i want to change the email address on my account",
            "my account was locked after too many attempts",
            "someone else may have access to my account",
            "i need to update my phone number on my profile",
            "the two factor code is not accepted when i sign in",
        ),
        "rare": (
            "the sign in page keeps rejecting my credentials",
            "i am locked out of my profile since yesterday",
            "my login stopped working after i changed my name",
        ),
    },
    "technical": {
        "common": (
            "the app crashes every time i open it",
            "the website shows an error when i click checkout",
            "the page will not load on my phone",
            "the app freezes when i upload a photo",
            "i get error code 500 when i save my settings",
            "the search button does nothing",
            "the mobile app is stuck on a blank screen",
        ),
        "rare": (
            "the software hangs whenever i try to export a report",
            "your site throws an exception on the payment page",
            "the screen goes white and the app quits by itself",
        ),
    },
    "returns": {
        "common": (
            "i want to return {order}",
            "the item in {order} arrived broken and i want to send it back",
            "i received the wrong size in {order} and need to exchange it",
            "how do i get a return label for {order}",
            "i sent back {order} but the return is not registered",
            "the product in {order} does not match the description so i want to return it",
            "i want to exchange {order} for a different color",
        ),
        "rare": (
            "the jacket from {order} does not fit so it has to go back",
            "i would like to swap {order} for another model",
            "the goods in {order} are defective and i want them taken back",
        ),
    },
    "cancellation": {
        "common": (
            "i want to cancel {order} before it ships",
            "please cancel my subscription",
            "i want to close my membership at the end of the month",
            "how do i cancel {order}",
            "i ordered {order} by mistake and want to cancel it",
            "stop my monthly plan please",
            "i no longer want {order} please cancel it",
        ),
        "rare": (
            "please call off {order} since i found it elsewhere",
            "i wish to terminate my plan effective today",
            "i have changed my mind about {order} and want to withdraw it",
        ),
    },
}

# Priority cues. "this is not urgent" is low although it contains "urgent".
PRIORITY_CUES: dict[str, dict[str, tuple[str, ...]]] = {
    "high": {
        "common": (
            "this is urgent",
            "please fix this asap",
            "i need this solved today",
            "my whole team is blocked by this",
            "this is critical for us",
        ),
        "rare": (
            "time is of the essence here",
            "every hour this stays broken costs us money",
        ),
    },
    "medium": {
        "common": (
            "please look into it this week",
            "i would appreciate a reply soon",
            "could you check this in the next few days",
            "please get back to me when you can this week",
        ),
        "rare": ("a fix in a couple of days would be fine",),
    },
    "low": {
        "common": (
            "this is not urgent",
            "no rush on this",
            "whenever you have time is fine",
            "it can wait until next week",
            "this is not a big deal",
        ),
        "rare": (
            "take your time honestly",
            "this is pretty low on my list",
        ),
    },
}

# Sentences that name other categories' words without stating a problem.
DISTRACTORS: tuple[str, ...] = (
    "i have paid every invoice on time for years",
    "your delivery drivers are usually very friendly",
    "my account has been with you since 2015",
    "the app update last month looked nice",
    "i have never had to return anything before",
    "i never thought about cancelling before",
    "my bank is usually quick with these things",
    "the tracking page design is nice",
    "the last shipment came early and i was happy",
    "i changed my password last year without trouble",
    "a friend told me the website was down yesterday but that is not my issue",
    "i know refunds take time",
)

FILLER: tuple[str, ...] = (
    "i have been a customer for a long time",
    "i tried restarting my computer first",
    "i already read the help pages",
    "my neighbour recommended your shop to me",
    "i am writing from my work email",
    "i hope you are having a good week",
    "i talked to your chat bot but it did not help",
    "thanks for the quick help last time",
    "i usually order a few times a year",
    "the weather here has been terrible",
)

GREETINGS: tuple[str, ...] = (
    "hi",
    "hello",
    "hello team",
    "good morning",
    "hey there",
    "dear support",
)
SIGNOFFS: tuple[str, ...] = ("thanks", "thank you", "best regards", "cheers", "kind regards")

PRIMARY_CUES: tuple[str, ...] = (
    "the main problem is that {issue}",
    "most importantly {issue}",
    "what i really need help with is this: {issue}",
    "my real issue is that {issue}",
)
SECONDARY_CUES: tuple[str, ...] = (
    "also a minor thing: {issue}",
    "less important but {issue}",
    "by the way {issue}, but that can wait",
    "side note: {issue}",
)

CATEGORY_REPLY: dict[str, str] = {
    "billing": "we have opened a billing review for you.",
    "shipping": "we have asked the carrier to trace your parcel.",
    "account": "we have sent you a secure link to recover your account.",
    "technical": "our engineers are looking into the error.",
    "returns": "we have emailed you a prepaid return label.",
    "cancellation": "we have started the cancellation for you.",
}
PRIORITY_REPLY: dict[str, str] = {
    "high": "a specialist will contact you within 2 hours.",
    "medium": "we will get back to you within 2 days.",
    "low": "we will follow up within a week.",
}

HARD_TAGS: tuple[str, ...] = ("two_issue", "rare_phrase", "buried", "typos")


@dataclass(frozen=True)
class CorpusSpec:
    """What the generator makes; every field feeds the demo world's cache key."""

    seed: int = 1234
    n_train: int = 6000
    n_val: int = 600
    n_test: int = 600
    # Share of hard tickets: training sees them less often than the test split does.
    train_hard_share: float = 0.5
    eval_hard_share: float = 0.4
    rare_share_in_train: float = 0.04

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < len(CATEGORIES) * len(PRIORITIES):
                raise ValueError(f"{name} must be at least {len(CATEGORIES) * len(PRIORITIES)}")
        for name in ("train_hard_share", "eval_hard_share", "rare_share_in_train"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")


@dataclass(frozen=True)
class Ticket:
    id: str
    text: str
    category: str
    priority: str
    split: str
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def hard(self) -> bool:
        return bool(self.tags)

    def to_json(self) -> str:
        record = asdict(self)
        record["tags"] = list(self.tags)
        return json.dumps(record, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> Ticket:
        record = json.loads(line)
        record["tags"] = tuple(record.get("tags", ()))
        return cls(**record)


def reference_reply(category: str, priority: str) -> str:
    return f"{CATEGORY_REPLY[category]} {PRIORITY_REPLY[priority]}"


def _order_id(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"order #{rng.randint(10000, 99999)}"
    letters = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(2))
    return f"order {letters}-{rng.randint(1000, 9999)}"


def _pick_phrase(rng: random.Random, table: dict[str, tuple[str, ...]], rare: bool) -> str:
    return rng.choice(table["rare"] if rare else table["common"])


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 4 or not word.isalpha():
        return word
    i = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:  # swap two neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1:  # drop one
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]  # double one


def _add_typos(sentence: str, rng: random.Random, rate: float) -> str:
    return " ".join(_typo(w, rng) if rng.random() < rate else w for w in sentence.split(" "))


def _sentence(clause: str) -> str:
    return clause[0].upper() + clause[1:] + "."


def _make_ticket(
    rng: random.Random, category: str, priority: str, tags: tuple[str, ...], rare_p: float
) -> tuple[str, bool]:
    """The ticket's text, and whether it used a rare paraphrase."""
    rare = "rare_phrase" in tags or rng.random() < rare_p
    issue = _pick_phrase(rng, ISSUES[category], rare).format(order=_order_id(rng))
    cue = _pick_phrase(rng, PRIORITY_CUES[priority], rare and rng.random() < 0.5)

    body: list[str] = []
    if "two_issue" in tags:
        other = rng.choice([c for c in CATEGORIES if c != category])
        second = _pick_phrase(rng, ISSUES[other], False).format(order=_order_id(rng))
        parts = [
            rng.choice(PRIMARY_CUES).format(issue=issue),
            rng.choice(SECONDARY_CUES).format(issue=second),
        ]
        rng.shuffle(parts)  # position must not give the answer away
        body.extend(parts)
    else:
        body.append(issue)

    n_filler = rng.randint(4, 7) if "buried" in tags else rng.randint(0, 1)
    n_distract = rng.randint(1, 2) if rng.random() < 0.6 else 0
    extras = rng.sample(FILLER, k=n_filler) + rng.sample(DISTRACTORS, k=n_distract)
    rng.shuffle(extras)
    if "buried" in tags:
        # the key sentence sits in the middle of a long ticket
        half = len(extras) // 2
        sentences = [*extras[:half], *body, cue, *extras[half:]]
    else:
        sentences = [*body, cue, *extras] if rng.random() < 0.5 else [*extras, *body, cue]
        if rng.random() < 0.3:  # priority first sometimes
            sentences.remove(cue)
            sentences.insert(0, cue)

    text = " ".join(_sentence(s) for s in sentences)
    if rng.random() < 0.7:
        text = f"{rng.choice(GREETINGS).capitalize()}, {text}"
    if rng.random() < 0.6:
        text = f"{text} {rng.choice(SIGNOFFS).capitalize()}."
    if "typos" in tags:
        text = _add_typos(text, rng, rate=0.08)
    elif rng.random() < 0.2:
        text = _add_typos(text, rng, rate=0.02)
    return text, rare


def _hard_tags(rng: random.Random, hard_share: float, kinds: tuple[str, ...]) -> tuple[str, ...]:
    if rng.random() >= hard_share:
        return ()
    first = rng.choice(kinds)
    if rng.random() < 0.25:  # some tickets are hard in two ways at once
        second = rng.choice([t for t in kinds if t != first])
        return tuple(sorted((first, second)))
    return (first,)


def _generate_split(
    rng: random.Random, split: str, n: int, hard_share: float, rare_p: float, seen: set[str]
) -> Iterator[Ticket]:
    # Labels cycle so the split is balanced by construction; the text is what varies.
    combos = [(c, p) for c in CATEGORIES for p in PRIORITIES]
    made = 0
    while made < n:
        category, priority = combos[made % len(combos)]
        # Training never asks for rare phrasings; it meets them only at the base rate `rare_p`.
        kinds = HARD_TAGS if split != "train" else tuple(t for t in HARD_TAGS if t != "rare_phrase")
        tags = _hard_tags(rng, hard_share, kinds)
        text, rare = _make_ticket(rng, category, priority, tags, rare_p)
        if rare:
            tags = tuple(sorted({*tags, "rare_phrase"}))
        if text in seen:  # splits must not share a ticket text
            continue
        seen.add(text)
        digest = hashlib.sha1(text.encode()).hexdigest()[:10]
        yield Ticket(f"{split}-{made:05d}-{digest}", text, category, priority, split, tags)
        made += 1


def generate_corpus(spec: CorpusSpec) -> dict[str, list[Ticket]]:
    """Deterministic train/val/test splits for `spec` (same spec, same tickets)."""
    rng = random.Random(spec.seed)
    seen: set[str] = set()
    splits: dict[str, list[Ticket]] = {}
    plan = (
        ("train", spec.n_train, spec.train_hard_share, spec.rare_share_in_train),
        ("val", spec.n_val, spec.eval_hard_share, spec.rare_share_in_train),
        ("test", spec.n_test, spec.eval_hard_share, spec.rare_share_in_train),
    )
    for split, n, hard_share, rare_p in plan:
        tickets = list(_generate_split(rng, split, n, hard_share, rare_p, seen))
        rng.shuffle(tickets)
        splits[split] = tickets
    return splits


def write_jsonl(tickets: Iterable[Ticket], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for t in tickets:
            f.write(t.to_json() + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[Ticket]:
    with path.open(encoding="utf-8") as f:
        return [Ticket.from_json(line) for line in f if line.strip()]
