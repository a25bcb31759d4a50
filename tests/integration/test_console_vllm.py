"""The admin console on the real stack (Serve, vLLM on the tiny model, Redis), in Debian's Chromium.

What tests/console/test_console_browser.py does against a lone gateway process, here against the session
stack's gateway replica and vLLM: log in, create a key, call vLLM with it from the `openai` client, find
the request's tokens and cost (vLLM's own usage at the stack's prices) on the key's page and the status page's
engine rows, then revoke the key and see the next call refused.
"""

from __future__ import annotations

import time

import openai
import pytest

from tests.integration.conftest import LiveStack
from tests.support import chromium_browser, console_key_cost, screenshot

pytestmark = pytest.mark.integration


def test_the_console_runs_a_key_against_vllm(stack: LiveStack) -> None:
    with chromium_browser() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(stack.base_url + "/ui/login")
        page.fill("input[name=admin_key]", stack.admin_key)
        page.click("text=Log in")
        assert page.inner_text("h1") == "Status" and stack.model in page.inner_text("main")
        # Serve's own view of the application: the gateway deployment and its running replica.
        assert "gateway HEALTHY RUNNING=1" in " ".join(page.inner_text("#deployments").split())
        screenshot(page, "console-vllm", "status")
        page.goto(stack.base_url + "/ui/keys")
        page.fill("#create-key input[name=name]", "console-vllm")
        page.fill("#create-key input[name=spend_per_day]", "1")
        page.click("text=Create key")
        key = page.inner_text("#new-key").strip()
        client = openai.OpenAI(api_key=key, base_url=stack.base_url + "/v1", max_retries=0,
                               _strict_response_validation=True)
        usage = client.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": "Hi."}],
                                               max_tokens=4, temperature=0).usage
        assert usage is not None and usage.completion_tokens == 4
        cost = usage.prompt_tokens * 0.001 + 4 * 0.002  # the stack's prices; a prompt under one KV block: no cache
        _, shown = console_key_cost(page, stack.base_url, "console-vllm")
        assert shown == f"{cost:,.6f}".rstrip("0").rstrip(".")
        screenshot(page, "console-vllm", "key")
        page.click("text=Revoke")
        assert "revoked" in page.inner_text("#key-state")
        started = time.monotonic()
        with pytest.raises(openai.AuthenticationError):
            while time.monotonic() - started < 2:
                client.models.list()
                time.sleep(0.05)
