"""Pure quota decisions: windows, the check, reservations, and OpenAI's rate-limit headers.

Both limiters (in-process and Redis/Lua) apply exactly this policy; tests pin it here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from gateway.governance.limits import Limits
from gateway.governance.pricing import to_nanos

# The eight counters every subject (a key, a team) has, in this order everywhere (Lua too). Spend is counted in
# nano-units of the currency (gateway.governance.pricing).
DIMENSIONS: tuple[str, ...] = (
    "requests", "tokens", "concurrent", "day", "month", "spend_day", "spend_month", "spend_total")
Kind = Literal["requests", "tokens", "concurrent", "day", "month", "spend_day", "spend_month", "spend_total"]
TOKEN_COUNTERS = (1, 3, 4)  # what settles to the tokens really used
SPEND_COUNTERS = (5, 6, 7)  # what settles to the real cost
BUDGETS = (3, 4, 5, 6, 7)  # a period's use (or all time's): seeded from the ledger where the store lacks them


def limit_values(limits: Limits) -> tuple[int | None, ...]:
    spend = (limits.spend_per_day, limits.spend_per_month, limits.spend_total)
    return (limits.rpm, limits.tpm, limits.max_concurrent, limits.tokens_per_day, limits.tokens_per_month,
            *(None if v is None else to_nanos(v) for v in spend))


def costs(reserve: int, requests: int = 1, spend: int = 0) -> tuple[int, ...]:
    """What one admission adds to each counter (`requests`: the sequences a batch runs at once, one a prompt;
    `spend`: its most possible cost in nano-units)."""
    return (requests, reserve, requests, reserve, reserve, spend, spend, spend)


@dataclass(frozen=True)
class Subject:
    """Something limits apply to: `key:<id>` or `team:<name>`."""

    id: str
    limits: Limits


def first_exceeded(
    limits: tuple[int | None, ...], used: tuple[int, ...], reserve: int, requests: int = 1, spend: int = 0
) -> int | None:
    """Index of the first dimension this admission would push over its limit, or None."""
    for d, (lim, u, c) in enumerate(zip(limits, used, costs(reserve, requests, spend))):
        if lim is not None and u + c > lim:
            return d
    return None


@dataclass(frozen=True)
class Period:
    """The windows an admission at `now` falls in (aligned on the epoch: equal across processes)."""

    now: float
    window_s: float

    @property
    def window(self) -> int:
        return int(self.now // self.window_s)

    @property
    def window_reset_s(self) -> float:
        return (self.window + 1) * self.window_s - self.now

    @property
    def day(self) -> str:
        return datetime.fromtimestamp(self.now, UTC).strftime("%Y%m%d")

    @property
    def month(self) -> str:
        return datetime.fromtimestamp(self.now, UTC).strftime("%Y%m")

    def day_reset_s(self) -> float:
        return 86400 - self.now % 86400

    def month_reset_s(self) -> float:
        d = datetime.fromtimestamp(self.now, UTC)
        nxt = datetime(d.year + (d.month == 12), d.month % 12 + 1, 1, tzinfo=UTC)
        return nxt.timestamp() - self.now

    def reset_s(self, dim: int) -> float:
        """Seconds until the counter `dim` starts again (an all-time budget never does: 0)."""
        day, month = self.day_reset_s(), self.month_reset_s()
        return (self.window_reset_s, self.window_reset_s, 1.0, day, month, day, month, 0.0)[dim]

    def keys(self, subject: str, prefix: str) -> list[str]:
        """Storage keys of a subject's eight counters in this period."""
        return [
            f"{prefix}:{subject}:rpm:{self.window}",
            f"{prefix}:{subject}:tpm:{self.window}",
            f"{prefix}:{subject}:conc",
            f"{prefix}:{subject}:day:{self.day}",
            f"{prefix}:{subject}:month:{self.month}",
            f"{prefix}:{subject}:spend_day:{self.day}",
            f"{prefix}:{subject}:spend_month:{self.month}",
            f"{prefix}:{subject}:spend",
        ]


@dataclass
class Admission:
    """A granted request: what it reserved where, to settle when it ends."""

    subjects: list[Subject]
    reserve: int
    period: Period
    lease: str
    requests: int = 1  # what it counts for rpm and max_concurrent: one a prompt of a batch
    spend: int = 0  # its most possible cost, in nano-units, reserved against spend budgets
    headers: dict[str, str] = field(default_factory=dict)
    unchecked: bool = False  # admitted without a check (quota store down, fail_open)
    settled: bool = False


@dataclass(frozen=True)
class Rejection:
    subject: str
    dim: int
    limit: int
    retry_after_s: int
    headers: dict[str, str]

    @property
    def kind(self) -> str:
        return DIMENSIONS[self.dim]


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `6m0s`, `1s`, `20ms`, `1h2m3s`."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    total = math.ceil(seconds)
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def retry_after(seconds: float) -> int:
    """`Retry-After` in whole seconds, at least 1."""
    return max(1, math.ceil(seconds))


def rate_headers(
    subjects: list[Subject], used: list[tuple[int, ...]], reserve: int, period: Period, admitted: bool,
    requests: int = 1,
) -> dict[str, str]:
    """`x-ratelimit-*` for requests and tokens: the tightest subject that has a limit."""
    headers: dict[str, str] = {}
    for dim, name in ((0, "requests"), (1, "tokens")):
        best: tuple[int, int] | None = None
        for subj, u in zip(subjects, used):
            lim = limit_values(subj.limits)[dim]
            if lim is None:
                continue
            remaining = lim - u[dim] - (costs(reserve, requests)[dim] if admitted else 0)
            if best is None or remaining < best[1]:
                best = (lim, max(0, remaining))
        if best is not None:
            headers[f"x-ratelimit-limit-{name}"] = str(best[0])
            headers[f"x-ratelimit-remaining-{name}"] = str(best[1])
            headers[f"x-ratelimit-reset-{name}"] = format_duration(period.window_reset_s)
    return headers


def reject(adm: Admission, used: list[tuple[int, ...]], index: int, dim: int) -> Rejection:
    subj = adm.subjects[index]
    lim = limit_values(subj.limits)[dim]
    assert lim is not None
    headers = rate_headers(adm.subjects, used, adm.reserve, adm.period, admitted=False)
    period = adm.period
    return Rejection(subj.id, dim, lim, retry_after(period.reset_s(dim)), headers)


def estimate_text_tokens(text: str) -> int:
    """A cheap estimate of a text's tokens with no tokenizer: 4 bytes a token (requests add their framing)."""
    return len(text.encode()) // 4


@dataclass(frozen=True)
class Demand:
    """The most work one validated request can make an engine do (built by `gateway.protocol`).

    `prompt_tokens`: every prompt together (an estimate, or the engine's exact count); `prompts`: how
    many prompts (a completions batch), each generating `n` sequences of at most `max_new_tokens`
    (None: up to the model's context).
    """

    prompt_tokens: int
    prompts: int = 1
    n: int = 1
    max_new_tokens: int | None = None

    @property
    def sequences(self) -> int:
        return self.prompts * self.n


def reservation(demand: Demand, max_model_len: int | None, prompt_tokens: int | None = None) -> int:
    """Tokens to reserve: the prompts (`prompt_tokens` if counted, else estimated) plus the most they may generate.

    Without `max_tokens` each sequence may run to the end of the context: `max_model_len` less its prompt.
    """
    prompt = demand.prompt_tokens if prompt_tokens is None else prompt_tokens
    if demand.max_new_tokens is not None:
        new = demand.sequences * demand.max_new_tokens
    else:
        context = max_model_len or 4096
        new = demand.n * max(demand.prompts, demand.prompts * context - prompt)
    return prompt + new


def unreported_usage(demand: Demand, events: int, opens_with_role: bool) -> tuple[int, int]:
    """Prompt and completion tokens to charge a stream that ended before the engine reported usage (pure).

    The client left, the engine failed mid-stream, or an upstream ignored `include_usage`: the
    prompt was processed (a stream's first event comes after prefill), so it costs its estimate;
    every event relayed with choices (or content delta) counts one token, except the role-only event a chat
    stream opens each choice with (`opens_with_role`). What the client was sent is charged, not nothing.
    """
    if events <= 0:
        return 0, 0
    role_events = demand.n if opens_with_role else 0
    return demand.prompt_tokens, max(0, events - role_events)
