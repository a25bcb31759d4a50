"""The publication gate: a pure decision on held-out loss."""

from __future__ import annotations

import math

from pydantic import BaseModel, Field


class GateDecision(BaseModel):
    """Whether a candidate may be published, and why."""

    passed: bool = Field(description="True: publish.")
    reason: str = Field(description="One line for the operator.")
    base_loss: float = Field(description="Held-out loss of the model training started from.")
    candidate_loss: float = Field(description="Held-out loss of the trained model.")
    limit: float = Field(description="Largest candidate loss accepted.")


def decide(base_loss: float, candidate_loss: float, max_regression: float, enabled: bool = True) -> GateDecision:
    """Pass when the candidate's held-out loss is at most `base_loss * (1 + max_regression)`."""
    limit = base_loss * (1.0 + max_regression)
    if not math.isfinite(candidate_loss):
        return GateDecision(passed=False, reason=f"candidate loss is {candidate_loss}", base_loss=base_loss,
                            candidate_loss=candidate_loss, limit=limit)
    if not enabled:
        return GateDecision(passed=True, reason="gate disabled", base_loss=base_loss, candidate_loss=candidate_loss,
                            limit=limit)
    ok = candidate_loss <= limit
    change = (candidate_loss - base_loss) / base_loss * 100 if base_loss else 0.0
    verb = "passes" if ok else "fails"
    return GateDecision(
        passed=ok,
        reason=f"held-out loss {base_loss:.4f} -> {candidate_loss:.4f} ({change:+.1f}%) {verb} the limit {limit:.4f}",
        base_loss=base_loss, candidate_loss=candidate_loss, limit=limit,
    )
