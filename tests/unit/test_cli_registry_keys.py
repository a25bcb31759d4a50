"""`raygate models promote|rollback|list` and `raygate keys` through the CLI's own entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.registry import Registry
from raygate.cli import main


@pytest.fixture
def home(tmp_path: Path) -> Path:
    reg = Registry(tmp_path / "registry")
    for i in range(2):
        src = tmp_path / f"src{i}"
        src.mkdir()
        (src / "config.json").write_text(f'{{"v": {i}}}')
        reg.publish("acme/chat", src, aliases=["stable"] if i == 0 else [])
    return tmp_path


def test_promote_canary_and_rollback(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--home", str(home), "models", "promote", "acme/chat@2", "--canary", "10"]) == 0
    assert "90% stays on version 1" in capsys.readouterr().out
    assert Registry(home / "registry").traffic("acme/chat") == {"canary": {"percent": 10.0, "of": "stable"}}
    assert main(["--home", str(home), "models", "promote", "acme/chat@2"]) == 0
    assert "1 -> 2" in capsys.readouterr().out
    assert Registry(home / "registry").traffic("acme/chat") == {}  # promoting the canary ends the split
    assert main(["--home", str(home), "models", "rollback", "acme/chat"]) == 0
    assert "2 -> 1" in capsys.readouterr().out
    assert main(["--home", str(home), "models", "rollback", "acme/chat"]) == 2
    assert "no earlier version" in capsys.readouterr().err
    assert main(["--home", str(home), "models", "promote", "acme/chat@stable"]) == 2  # needs an exact version
    assert main(["--home", str(home), "models", "promote", "acme/chat@9"]) == 2
    assert "not found" in capsys.readouterr().err


def test_keys_cli_creates_and_lists(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--home", str(home), "keys", "create", "--name", "ci"]) == 0
    created = capsys.readouterr().out
    plaintext = created.split("store it now):")[1].split()[0]
    assert main(["--home", str(home), "keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert "ci" in listing and plaintext not in listing and plaintext[:8] in listing


def test_keys_cli_sets_spend_budgets_and_shows_cost(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--home", str(home), "keys", "create", "--name", "spender", "--spend-per-day", "2.5",
                 "--spend-total", "40"]) == 0
    capsys.readouterr()
    assert main(["--home", str(home), "keys", "list"]) == 0
    assert "spend_per_day=2.5,spend_total=40.0" in capsys.readouterr().out
    assert main(["--home", str(home), "keys", "team", "ml", "--spend-per-month", "100"]) == 0
    assert "'spend_per_month': 100.0" in capsys.readouterr().out
