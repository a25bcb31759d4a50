"""`/ui`: the admin console's pages and form actions (server-rendered, no script).

Behind the admin key: sent as a bearer token, or exchanged at `/ui/login` for a session cookie
(HttpOnly, SameSite=Strict) whose forms carry a CSRF token. Every action calls what `/admin/*`
and the `raygate models` commands call: the key store, the ledger, the limiter and the registry.
No `from __future__ import annotations`: FastAPI must see the route-local dependency alias.
"""

import asyncio
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, get_args

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.responses import HTMLResponse, RedirectResponse, Response

from gateway.backend import ModelBackend
from gateway.console.charts import bar_chart
from gateway.console.session import COOKIE, ConsoleSessions
from gateway.errors import AuthenticationFailed, ServiceDisabled
from gateway.governance.gate import Governance
from gateway.governance.limits import Limits
from gateway.governance.store import KeyNotFound, KeyStore, reachable
from gateway.governance.usage_report import CSV_COLUMNS, budget_view, usage_csv
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from models.registry import Registry, RegistryError
from serve.engine import Endpoint, stats_by_version

TEMPLATES = Path(__file__).parent / "templates"
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY", "referrer-policy": "same-origin", "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}
LIMIT_FIELDS = tuple(Limits.model_fields)
MAX_EXPIRY_DAYS = 36_500
ENDPOINTS: tuple[str, ...] = get_args(Endpoint)


class NeedsLogin(Exception):  # noqa: N818 - a redirect, not an error
    """No session and no admin bearer token: the browser goes to the login page."""


class FormError(ValueError):
    """A form value the console refuses; the page is shown again with the message, status 400."""


def _environment() -> Any:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    env.filters["money"] = lambda v: f"{v:,.6f}".rstrip("0").rstrip(".") if isinstance(v, float) else v
    return env


def _limits_from(form: Any) -> Limits:
    values = {f: str(form.get(f, "")).strip() for f in LIMIT_FIELDS}
    try:
        return Limits.model_validate({f: v for f, v in values.items() if v})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise FormError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def _text(form: Any, name: str, limit: int) -> str:
    """A form's text field, stripped and cut to `limit`; one with a NUL (no database keeps it) is refused."""
    value = str(form.get(name, "")).strip()[:limit]
    if "\x00" in value:
        raise FormError(f"{name}: no NUL characters")
    return value


def _expiry(form: Any) -> datetime | None:
    """`expires_in_days` from now (blank: never), in (0, MAX_EXPIRY_DAYS]."""
    days = _text(form, "expires_in_days", 50)
    if not days:
        return None
    try:
        value = float(days)
    except ValueError:
        raise FormError("expires_in_days is a number of days") from None
    if not 0 < value <= MAX_EXPIRY_DAYS:  # NaN too
        raise FormError(f"expires_in_days is more than 0 and at most {MAX_EXPIRY_DAYS:,}")
    return datetime.now(UTC) + timedelta(days=value)


def _names(text: str) -> list[str] | None:
    names = [n.strip() for n in text.replace("\n", ",").split(",") if n.strip()]
    return names or None


def serve_deployments() -> list[dict[str, Any]]:
    """This gateway's Serve application, each deployment with its status and replicas by state, as Serve's
    controller reports them; [] where the gateway does not run in Serve (`raygate gateway`). Blocking: call it
    from a thread."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        app_name = serve.get_replica_context().app_name
    except RayServeException:
        return []
    app = serve.status().applications.get(app_name)
    if app is None:
        return []
    return [{"name": name, "status": str(getattr(d.status, "value", d.status)),
             "replicas": {str(getattr(state, "value", state)): n for state, n in d.replica_states.items()}}
            for name, d in app.deployments.items()]


def slo_attainment(metrics: GatewayMetrics | None) -> dict[str, Any]:
    """This replica's requests that met the TTFT/TPOT targets, and their share (from its own counters)."""
    if metrics is None:
        return {"met": 0, "missed": 0, "share": None}
    metrics.flush()
    counts = {"met": 0.0, "missed": 0.0}
    for family in metrics.slo.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("result") in counts:
                counts[sample.labels["result"]] += sample.value
    total = counts["met"] + counts["missed"]
    return {"met": int(counts["met"]), "missed": int(counts["missed"]),
            "share": round(counts["met"] / total, 4) if total else None}


def console_router(
    gov: Governance, backend: ModelBackend, registry: Registry | None, settings: GatewaySettings,
    metrics: GatewayMetrics | None,
) -> APIRouter:
    env = _environment()
    sessions = ConsoleSessions(gov.session_key("raygate-console"), settings.console_session_s)
    css = (TEMPLATES / "console.css").read_bytes()
    r = APIRouter(prefix="/ui", include_in_schema=False)

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        nonce = getattr(request.state, "console_nonce", None)
        html = env.get_template(name).render(
            csrf=sessions.csrf(nonce) if nonce else "", currency=settings.currency, nav=name.split(".")[0],
            session=nonce is not None, **context)
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    async def admin(request: Request) -> KeyStore:
        """The store, for a session (its forms checked for their CSRF token) or an admin bearer token."""
        nonce = sessions.nonce(request.cookies.get(COOKIE))
        if nonce is None:
            if not request.headers.get("authorization"):
                raise NeedsLogin
            gov.authenticate_admin(request)  # a bearer token: no browser sends it by itself, no CSRF to fear
            nonce = "bearer"
        request.state.console_nonce = nonce
        if request.method == "POST" and nonce != "bearer":
            form = await request.form()
            if not sessions.csrf_ok(nonce, str(form.get("csrf", ""))):
                raise AuthenticationFailed("The form's CSRF token is missing or stale: reload the page.")
        if gov.store is None:
            raise ServiceDisabled("This gateway runs without a key store.")
        return gov.store

    Store = Annotated[KeyStore, Depends(admin)]

    async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        with reachable():
            return await asyncio.to_thread(fn, *args, **kwargs)

    @r.get("/console.css")
    async def stylesheet() -> Response:
        return Response(css, media_type="text/css", headers={"cache-control": "max-age=300"})

    @r.get("/login")
    async def login_form(request: Request) -> HTMLResponse:
        return page(request, "login.html")

    @r.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        if not gov.is_admin_key(str(form.get("admin_key", ""))):
            return page(request, "login.html", status=401, error="That is not this gateway's admin key.")
        response = RedirectResponse("/ui", status_code=303)
        response.set_cookie(COOKIE, sessions.issue(), max_age=int(settings.console_session_s), path="/ui",
                            httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    @r.post("/logout")
    async def logout(request: Request, store: Store) -> Response:
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    @r.get("")
    async def overview(request: Request, store: Store) -> HTMLResponse:
        engines = stats_by_version(backend.running_engines())
        ready = await backend.readiness()
        in_flight = sum(s["admitted"] for s in engines.values())
        deployments = await asyncio.to_thread(serve_deployments)
        return page(request, "overview.html", engines=engines, ready=ready, in_flight=in_flight, deployments=deployments,
                    slo=slo_attainment(metrics), cards=backend.cards(), slo_ttft_s=settings.slo_ttft_s,
                    slo_tpot_s=settings.slo_tpot_s)

    # -- keys -------------------------------------------------------------------------------------------
    @r.get("/keys")
    async def keys(request: Request, store: Store, include_revoked: bool = False) -> HTMLResponse:
        records = await call(store.list_keys, include_revoked=include_revoked)
        return page(request, "keys.html", keys=records, include_revoked=include_revoked, fields=LIMIT_FIELDS,
                    endpoints=ENDPOINTS)

    @r.post("/keys")
    async def create_key(request: Request, store: Store) -> HTMLResponse:
        form = await request.form()
        try:
            limits = _limits_from(form)
            endpoints = form.getlist("endpoints") or None
            if endpoints and not set(endpoints) <= set(ENDPOINTS):
                raise FormError("unknown endpoint")
            fields = {"name": _text(form, "name", 200), "owner": _text(form, "owner", 200) or None,
                      "team": _text(form, "team", 200) or None, "tier": _text(form, "tier", 50) or "default",
                      "allowed_models": _names(_text(form, "models", 100_000))}
            expires = _expiry(form)
        except FormError as exc:
            records = await call(store.list_keys)
            return page(request, "keys.html", status=400, keys=records, error=str(exc), fields=LIMIT_FIELDS,
                        endpoints=ENDPOINTS, include_revoked=False)
        record, plaintext = await call(store.create_key, **fields, allowed_endpoints=endpoints, limits=limits,
                                       expires_at=expires)
        return page(request, "key_created.html", key=record, plaintext=plaintext)

    async def key_page(request: Request, store: KeyStore, key_id: str, status: int = 200, **extra: Any) -> HTMLResponse:
        try:
            record = await call(store.get_key, key_id)
        except KeyNotFound:
            return page(request, "message.html", status=404, message=f"No API key with id {key_id}.")
        budgets = {}
        for subject in gov.subjects(record):
            try:
                budgets[subject.id] = budget_view(subject.limits, await gov.limiter.used(subject), settings.currency)
            except Exception:  # noqa: BLE001 - the quota store is down: the page shows the key without live use
                budgets[subject.id] = {}
        usage = await call(store.usage_summary, group_by=("day", "model"), key_id=key_id,
                           since=datetime.now(UTC).date() - timedelta(days=30))
        return page(request, "key.html", status=status, key=record, budgets=budgets, usage=usage,
                    fields=LIMIT_FIELDS, endpoints=ENDPOINTS, **extra)

    async def change_key(request: Request, fn: Any, key_id: str, **kwargs: Any) -> tuple[Any, HTMLResponse | None]:
        """`fn(key_id, **kwargs)` on the store and this process's key cache cleared (others follow within
        key_cache_ttl_s); or the 404 page."""
        try:
            result = await call(fn, key_id, **kwargs)
        except KeyNotFound:
            return None, page(request, "message.html", status=404, message=f"No active API key with id {key_id}.")
        gov.keys.invalidate()
        return result, None

    @r.get("/keys/{key_id}")
    async def key(request: Request, key_id: str, store: Store) -> HTMLResponse:
        return await key_page(request, store, key_id)

    @r.post("/keys/{key_id}/limits")
    async def key_limits(request: Request, key_id: str, store: Store) -> HTMLResponse:
        form = await request.form()
        try:
            limits = _limits_from(form)
            models = _names(_text(form, "models", 100_000))
            endpoints = form.getlist("endpoints") or None
            if endpoints and not set(endpoints) <= set(ENDPOINTS):
                raise FormError("unknown endpoint")
        except FormError as exc:
            return await key_page(request, store, key_id, status=400, error=str(exc))
        _, missing = await change_key(request, store.update_key, key_id, limits=limits, allowed_endpoints=endpoints,
                                      allowed_models=models)
        return missing or await key_page(request, store, key_id, notice="Limits saved.")

    @r.post("/keys/{key_id}/revoke")
    async def revoke(request: Request, key_id: str, store: Store) -> HTMLResponse:
        _, missing = await change_key(request, store.revoke_key, key_id)
        return missing or await key_page(request, store, key_id,
                                         notice="Revoked: every gateway refuses it within a second.")

    @r.post("/keys/{key_id}/rotate")
    async def rotate(request: Request, key_id: str, store: Store) -> HTMLResponse:
        rotated, missing = await change_key(request, store.rotate_key, key_id)
        if missing:
            return missing
        record, plaintext = rotated
        return page(request, "key_created.html", key=record, plaintext=plaintext, rotated_from=key_id)

    # -- teams ------------------------------------------------------------------------------------------
    @r.get("/teams")
    async def teams(request: Request, store: Store) -> HTMLResponse:
        return page(request, "teams.html", teams=await call(store.list_teams), fields=LIMIT_FIELDS)

    @r.post("/teams")
    async def set_team(request: Request, store: Store) -> HTMLResponse:
        form = await request.form()
        try:
            name = _text(form, "team", 200)
            if not name:
                raise FormError("a team needs a name")
            limits = _limits_from(form)
        except FormError as exc:
            return page(request, "teams.html", status=400, teams=await call(store.list_teams), fields=LIMIT_FIELDS,
                        error=str(exc))
        await call(store.set_team, name, limits)
        gov.keys.invalidate()
        return page(request, "teams.html", teams=await call(store.list_teams), fields=LIMIT_FIELDS,
                    notice=f"Team {name} saved.")

    # -- usage and spend --------------------------------------------------------------------------------
    def usage_range(since: str | None, until: str | None) -> tuple[date, date]:
        try:
            end = date.fromisoformat(until) if until else datetime.now(UTC).date()  # the ledger's days are UTC
            start = date.fromisoformat(since) if since else end - timedelta(days=min(30, (end - date.min).days))
        except ValueError:
            raise FormError("dates are YYYY-MM-DD") from None
        if start > end:
            raise FormError(f"{start} is after {end}")
        return start, end

    @r.get("/usage")
    async def usage(request: Request, store: Store, since: str | None = None, until: str | None = None) -> HTMLResponse:
        try:
            start, end = usage_range(since, until)
        except FormError as exc:
            return page(request, "message.html", status=400, message=str(exc))
        if gov.ledger is not None:
            await gov.ledger.flush()
        by = {}
        for group in ("day", "model", "key_id"):
            by[group] = await call(store.usage_summary, group_by=(group,), since=start, until=end)
        totals = await call(store.usage_totals, since=start, until=end)
        charts = {
            "day": bar_chart(f"Spend by day ({settings.currency})", [(g["day"], g["cost"]) for g in by["day"]],
                             settings.currency),
            "tokens": bar_chart("Tokens by day", [(g["day"], g["total_tokens"]) for g in by["day"]], "tokens"),
            "model": bar_chart(f"Spend by model ({settings.currency})",
                               [(g["model"], g["cost"]) for g in by["model"]], settings.currency),
            "key": bar_chart(f"Spend by key ({settings.currency})",
                             [(g["key_id"] or "-", g["cost"]) for g in by["key_id"]], settings.currency),
        }
        return page(request, "usage.html", by=by, totals=totals, charts=charts, since=start, until=end,
                    columns=CSV_COLUMNS)

    @r.get("/usage.csv")
    async def usage_export(request: Request, store: Store, since: str | None = None,
                           until: str | None = None) -> Response:
        try:
            start, end = usage_range(since, until)
        except FormError as exc:
            return page(request, "message.html", status=400, message=str(exc))
        rows = await call(store.usage_summary, group_by=("day", "key_id", "model"), since=start, until=end)
        return Response(usage_csv(rows, ["day", "key_id", "model"], settings.currency), media_type="text/csv",
                        headers={"content-disposition": 'attachment; filename="raygate-usage.csv"'})

    # -- models -----------------------------------------------------------------------------------------
    def models_context() -> dict[str, Any]:
        if registry is None:
            return {"registry": None, "models": []}
        out = []
        for name in registry.names():
            versions = [registry.manifest(name, v) for v in registry.versions(name)]
            out.append({"name": name, "versions": versions, "aliases": registry.aliases(name),
                        "traffic": registry.traffic(name), "history": registry.history(name)[-5:]})
        return {"registry": registry, "models": out}

    @r.get("/models")
    async def models(request: Request, store: Store) -> HTMLResponse:
        return page(request, "models.html", **await call(models_context))

    @r.post("/models/{name:path}/{action}")
    async def model_action(request: Request, name: str, action: str, store: Store) -> HTMLResponse:
        if registry is None:
            return page(request, "message.html", status=404, message="This gateway has no model registry.")
        form = await request.form()
        try:
            if action == "promote":
                registry.promote(name, int(str(form.get("version"))))
                notice = f"{name}@{form.get('version')} is now @stable."
            elif action == "canary":
                percent = float(str(form.get("percent")))
                if not 0 < percent < 100:
                    raise FormError("a canary share is between 0 and 100 %")
                registry.set_canary(name, int(str(form.get("version"))), percent)
                notice = f"{percent:g}% of {name}@stable traffic goes to version {form.get('version')}."
            elif action == "clear-canary":
                registry.clear_canary(name)
                notice = f"{name} has no canary."
            elif action == "rollback":
                notice = f"{name}@stable rolled back to version {registry.rollback(name)}."
            else:
                return page(request, "message.html", status=404, message=f"No model action {action}.")
        except (FormError, RegistryError, ValueError, LookupError) as exc:
            return page(request, "models.html", status=400, error=str(exc), **await call(models_context))
        return page(request, "models.html", notice=notice + " Gateways follow within registry_poll_s.",
                    **await call(models_context))

    return r


async def needs_login(request: Request, exc: Exception) -> Response:
    return RedirectResponse("/ui/login", status_code=303)


