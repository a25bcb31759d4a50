"""Routing policy, pure: which targets a request tries, in which order, at what priority."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.rollout import weighted_choice


class RouteTarget(BaseModel):
    """One model a route sends a share of its traffic to."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="A served model id (for example `raygate/tiny-chat@2`).")
    weight: float = Field(default=1.0, ge=0, description="Share of traffic, relative to the route's other targets.")


class RouteConfig(BaseModel):
    """A name clients send as `model`, split over targets, with fallbacks."""

    model_config = ConfigDict(extra="forbid")

    targets: list[RouteTarget] = Field(min_length=1, description="Weighted targets (a canary is a small weight).")
    fallbacks: list[str] = Field(
        default_factory=list, description="Tried in order when the chosen target is saturated or failing."
    )

    @model_validator(mode="after")
    def _some_weight(self) -> RouteConfig:
        if sum(t.weight for t in self.targets) <= 0:
            raise ValueError("a route needs at least one target with weight > 0")
        return self


def pick(route: RouteConfig, u: float) -> str:
    """The weighted choice among a route's targets for a uniform draw `u` in [0, 1)."""
    return weighted_choice(((t.model, t.weight) for t in route.targets), u)


def plan(route: RouteConfig, u: float, max_attempts: int) -> list[str]:
    """Targets in the order to try them: the weighted pick, the other targets, the fallbacks."""
    first = pick(route, u)
    order = [first] + [t.model for t in sorted(route.targets, key=lambda t: -t.weight) if t.weight > 0]
    order += route.fallbacks
    seen: list[str] = []
    for m in order:
        if m not in seen:
            seen.append(m)
    return seen[:max_attempts]


def priority_for(tier: str, tiers: dict[str, int]) -> int:
    """vLLM priority of a key tier (lower is served first); unknown tiers get 0."""
    return tiers.get(tier, 0)
