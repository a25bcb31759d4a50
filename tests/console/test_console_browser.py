"""The admin console in a real browser: Debian's Chromium, headless, driven by Playwright.

A `raygate gateway` process over HTTP (SQLite key store and ledger, a registry on disk, the deterministic engine
following `demo@stable` as vLLM would). What an operator does, end to end: log in with the admin key, create a
key with a spend budget and use it from the official `openai` client, see its usage and cost appear, promote a
version and see the answers' `x-raygate-model-version` change, revoke the key and see the next call refused.
A screenshot of every page goes to `build/test-artifacts/console/` (RAYGATE_TEST_ARTIFACTS overrides it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml

from models.registry import Registry
from tests.support import chromium_browser, console_key_cost, free_port, screenshot, wait_until

ADMIN = "rg-admin-console-0123456789abcdef"


class Gateway:
    def __init__(self, url: str, registry: Registry) -> None:
        self.url, self.registry = url, registry

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(api_key=key, base_url=self.url + "/v1", max_retries=0, _strict_response_validation=True)

    def version_served(self, key: str) -> str:
        raw = self.client(key).chat.completions.with_raw_response.create(
            model="demo", messages=[{"role": "user", "content": "hello there"}], max_tokens=8)
        return raw.headers["x-raygate-model-version"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    home = tmp_path_factory.mktemp("console")
    registry = Registry(home / "registry")
    for version in (1, 2):
        src = home / f"v{version}"
        src.mkdir()
        (src / "config.json").write_text(f'{{"version": {version}}}')
        registry.publish("demo", src, aliases=["stable"] if version == 1 else [])
    cfg = home / "gateway.yaml"
    cfg.write_text(yaml.safe_dump({
        "gateway": {"settings": {
            "home": str(home), "currency": "EUR", "ledger_flush_interval_s": 0.2,
            "prices": {"demo": {"input": 1000, "cached_input": 100, "output": 2000}},
        }},
        "serve": {"registry": str(home / "registry"), "models": [
            {"model": "demo@stable", "engine": "fake", "registry_poll_s": 0.5, "fake": {"itl_ms": 1}},
        ]},
    }))
    port = free_port()
    log = home / "gateway.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "raygate.cli", "gateway", "--config", str(cfg), "--port", str(port)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, "RAYGATE_ADMIN_KEY": ADMIN})
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(url + "/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(up, 60, every_s=0.2), log.read_text()
        yield Gateway(url, registry)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium_browser() as browser:
        yield browser


def _shot(page: Any, name: str) -> None:
    screenshot(page, "console", name)


def test_an_operator_runs_a_key_and_a_roll_out_from_the_console(gateway: Gateway, browser: Any) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(gateway.url + "/ui")
    assert page.url.endswith("/ui/login")  # no session: the login page
    page.fill("input[name=admin_key]", "not-the-admin-key-0123456789")
    page.click("text=Log in")
    assert "not this gateway's admin key" in page.inner_text("main")
    _shot(page, "login")
    page.fill("input[name=admin_key]", ADMIN)
    page.click("text=Log in")
    assert page.url.endswith("/ui") and page.inner_text("h1") == "Status"
    assert "demo@1" in page.inner_text("main")
    _shot(page, "status")

    # A key with a spend budget, its plaintext shown once, used from the official client.
    page.click("text=Keys")
    page.fill("#create-key input[name=name]", "browser-made")
    page.fill("#create-key input[name=spend_per_day]", "2.5")
    page.check("#create-key input[value=chat]")
    page.click("text=Create key")
    key = page.inner_text("#new-key").strip()
    assert key.startswith("rg-")
    _shot(page, "key-created")
    assert gateway.version_served(key) == "demo@1"
    with pytest.raises(openai.PermissionDeniedError):  # the endpoint list the form set: chat only
        gateway.client(key).completions.create(model="demo", prompt="hi", max_tokens=2)

    # Its usage and cost appear on its page: 2 prompt tokens at 0.001 + 8 generated at 0.002 (the fake engine
    # counts words).
    key_url, cost = console_key_cost(page, gateway.url, "browser-made")
    assert cost == "0.018"
    assert "spend_day" in page.inner_text("main") and "2.5 EUR" in page.inner_text("main")
    _shot(page, "key")
    page.click("text=Usage & spend")
    assert page.inner_text("#total-cost") == "0.018" and page.locator("svg.chart").count() == 4
    _shot(page, "usage")
    page.click("text=Teams")
    page.fill("#set-team input[name=team]", "ml")
    page.fill("#set-team input[name=spend_per_month]", "100")
    page.click("text=Save team")
    assert "spend_per_month=100.0" in page.inner_text("#teams")
    _shot(page, "teams")

    # Promote version 2: the gateway follows the registry and the next answers say so.
    page.click("text=Models")
    page.click("#model-demo tr:nth-child(2) >> text=Promote to stable")
    assert "demo@2 is now @stable" in page.inner_text("main")
    _shot(page, "models")
    assert wait_until(lambda: gateway.version_served(key) == "demo@2", 20, every_s=0.2)

    # Revoke: the next call is refused.
    page.goto(key_url)
    page.click("text=Revoke")
    assert "revoked" in page.inner_text("#key-state")
    started = time.monotonic()
    with pytest.raises(openai.AuthenticationError):
        while time.monotonic() - started < 2:
            gateway.version_served(key)
            time.sleep(0.05)
    page.close()


def test_a_form_from_another_site_or_without_the_session_does_nothing(gateway: Gateway, browser: Any) -> None:
    """Cross-site: the session cookie is SameSite=Strict and every form needs the session's CSRF token."""
    before = gateway.registry.aliases("demo")
    no_session = httpx.post(gateway.url + "/ui/models/demo/rollback", data={"csrf": "x"}, follow_redirects=False)
    assert no_session.status_code == 303 and no_session.headers["location"] == "/ui/login"
    page = browser.new_page()
    page.goto(gateway.url + "/ui/login")
    page.fill("input[name=admin_key]", ADMIN)
    page.click("text=Log in")
    cookie = next(c for c in page.context.cookies() if c["name"] == "rg_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    forged = httpx.post(gateway.url + "/ui/models/demo/rollback", data={"csrf": "forged"},
                        cookies={"rg_console": cookie["value"]})
    assert forged.status_code == 401 and set(forged.json()["error"]) == {"message", "type", "param", "code"}
    assert gateway.registry.aliases("demo") == before
    page.close()


@pytest.mark.parametrize(("path", "form", "says"), [
    ("/ui/keys", {"name": "x", "expires_in_days": "inf"}, "expires_in_days is more than 0"),
    ("/ui/keys", {"name": "x", "expires_in_days": "1e9"}, "expires_in_days is more than 0"),
    ("/ui/keys", {"name": "x", "expires_in_days": "-5"}, "expires_in_days is more than 0"),  # born expired
    ("/ui/keys", {"name": "x", "expires_in_days": "soon"}, "expires_in_days is a number of days"),
    ("/ui/keys", {"name": "a\x00b"}, "name: no NUL characters"),  # PostgreSQL keeps no NUL in text
    ("/ui/keys", {"name": "x", "models": "demo,\x00"}, "models: no NUL characters"),
    ("/ui/teams", {"team": "t\x00"}, "team: no NUL characters"),
])
def test_a_hostile_form_is_refused_with_its_reason_and_changes_nothing(
        gateway: Gateway, path: str, form: dict[str, str], says: str) -> None:
    admin = {"authorization": f"Bearer {ADMIN}"}
    listed = httpx.get(gateway.url + "/admin/keys", headers=admin).json()["data"]
    answer = httpx.post(gateway.url + path, data=form, headers=admin)
    assert answer.status_code == 400 and says in answer.text, answer.text[-500:]
    assert httpx.get(gateway.url + "/admin/keys", headers=admin).json()["data"] == listed


@pytest.mark.parametrize(("query", "status"), [
    ({"until": "0001-01-05"}, 200),  # the default 30 days before it would be before year 1
    ({"since": "2026-12-31", "until": "2026-01-01"}, 400), ({"since": "yesterday"}, 400),
])
def test_usage_dates_at_the_calendars_edges_are_answered(gateway: Gateway, query: dict[str, str], status: int) -> None:
    for path in ("/ui/usage", "/ui/usage.csv"):
        answer = httpx.get(gateway.url + path, params=query, headers={"authorization": f"Bearer {ADMIN}"})
        assert answer.status_code == status, (path, answer.text[-300:])
