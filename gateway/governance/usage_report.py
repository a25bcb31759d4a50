"""What usage and budgets look like to an operator: the ledger's groups as CSV, a subject's limits with their use
(pure; the admin API and the console both show them)."""

from __future__ import annotations

import csv
import io
from typing import Any

from gateway.governance.limits import Limits
from gateway.governance.pricing import from_nanos
from gateway.governance.quota_policy import DIMENSIONS, SPEND_COUNTERS, limit_values

CSV_COLUMNS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "total_tokens", "cost", "errors",
               "mean_latency_ms")


def usage_csv(rows: list[dict[str, Any]], group_by: list[str], currency: str) -> str:
    """The groups as CSV: their columns, then the sums (cost in the currency)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*group_by, *CSV_COLUMNS[:-3], f"cost_{currency.lower()}", *CSV_COLUMNS[-2:]])
    for row in rows:
        # A cell a spreadsheet would run as a formula (a client-chosen `user`, say) is written as text.
        cells = [("'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@") else v)
                 for v in (*(row[g] for g in group_by), *(row[c] for c in CSV_COLUMNS))]
        writer.writerow(["" if c is None else c for c in cells])
    return out.getvalue()


def budget_view(limits: Limits, used: tuple[int, ...], currency: str) -> dict[str, Any]:
    """Each limit set, with what is used of it now (spend in the currency)."""
    out = {}
    for d, (name, lim) in enumerate(zip(DIMENSIONS, limit_values(limits), strict=True)):
        if lim is None:
            continue
        spend = d in SPEND_COUNTERS
        out[name] = {"limit": from_nanos(lim) if spend else lim, "used": from_nanos(used[d]) if spend else used[d],
                     "unit": currency if spend else "requests" if d in (0, 2) else "tokens"}
    return out
