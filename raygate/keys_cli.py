"""`raygate keys|teams|usage`: key management straight against the key store.

Uses the same settings as the gateway (`RAYGATE_DATABASE_URL`, `RAYGATE_KEY_SECRET`, or
SQLite and the secret in `$RAYGATE_HOME`). A revocation reaches running gateways within
their key-cache TTL (under a second).
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, get_args

from gateway.governance.limits import Limits
from gateway.governance.records import KeyRecord
from gateway.governance.store import KeyStore, open_store
from gateway.settings import GatewaySettings
from serve.engine import Endpoint

ENDPOINTS: tuple[str, ...] = get_args(Endpoint)

LIMIT_FLAGS = ("rpm", "tpm", "max_concurrent", "tokens_per_day", "tokens_per_month")
SPEND_FLAGS = ("spend_per_day", "spend_per_month", "spend_total")  # in the gateway's currency


def store_for(home: Path) -> KeyStore:
    settings = GatewaySettings(home=home)
    return open_store(settings.db_url(), settings.hmac_secret())


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(**{f: getattr(args, f) for f in LIMIT_FLAGS + SPEND_FLAGS if getattr(args, f) is not None})


def _row(k: KeyRecord) -> str:
    state = "revoked" if k.revoked_at else ("expired" if not k.usable() else "active")
    limits = ",".join(f"{n}={v}" for n, v in k.limits.model_dump(exclude_none=True).items()) or "-"
    return f"{k.id:26s} {k.prefix}...  {state:8s} {k.tier:8s} {k.team or '-':12s} {limits:30s} {k.name}"


def cmd_keys(args: argparse.Namespace, home: Path) -> int:
    store = store_for(home)
    try:
        if args.keys_cmd == "create":
            expires = datetime.now(UTC) + timedelta(seconds=args.expires_in) if args.expires_in else None
            record, plaintext = store.create_key(
                name=args.name, owner=args.owner, team=args.team, tier=args.tier, allowed_models=args.model,
                allowed_endpoints=args.endpoint, limits=_limits(args), expires_at=expires,
            )
            print(f"created {record.id}\nkey (shown once, store it now): {plaintext}")
        elif args.keys_cmd == "list":
            for k in store.list_keys(include_revoked=args.all):
                print(_row(k))
        elif args.keys_cmd == "show":
            print(json.dumps(store.get_key(args.key_id).model_dump(mode="json"), indent=2))
        elif args.keys_cmd == "rotate":
            record, plaintext = store.rotate_key(args.key_id, grace_s=args.grace)
            print(f"rotated {args.key_id} -> {record.id}\nkey (shown once, store it now): {plaintext}")
        elif args.keys_cmd == "revoke":
            print(_row(store.revoke_key(args.key_id)))
        elif args.keys_cmd == "team":
            store.set_team(args.team, _limits(args))
            print(f"team {args.team}: {_limits(args).model_dump(exclude_none=True)}")
        elif args.keys_cmd == "usage":
            rows: list[dict[str, Any]] = store.usage_summary(since=args.since, until=args.until, key_id=args.key)
            for r in rows:
                print(f"{r['day']} {r['key_id'] or '-':26s} {r['model']:30s} req={r['requests']} "
                      f"prompt={r['prompt_tokens']} cached={r['cached_tokens']} completion={r['completion_tokens']} "
                      f"cost={r['cost']:g} errors={r['errors']}")
    finally:
        store.close()
    return 0


def add_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="API keys, team limits and usage (straight against the key store).")
    ksub = keys.add_subparsers(dest="keys_cmd", required=True)

    def limit_flags(p: argparse.ArgumentParser) -> None:
        for f in LIMIT_FLAGS:
            p.add_argument("--" + f.replace("_", "-"), dest=f, type=int, default=None)
        for f in SPEND_FLAGS:
            p.add_argument("--" + f.replace("_", "-"), dest=f, type=float, default=None,
                           help="Spend budget in the gateway's currency.")

    create = ksub.add_parser("create", help="A new key; its plaintext is printed once.")
    create.add_argument("--name", default="")
    create.add_argument("--owner")
    create.add_argument("--team")
    create.add_argument("--tier", default="default")
    create.add_argument("--model", action="append", help="Allowed model or alias (repeatable; default: all).")
    create.add_argument("--endpoint", action="append", choices=ENDPOINTS,
                        help="Allowed endpoint (repeatable; default: all).")
    create.add_argument("--expires-in", type=float, help="Seconds until the key stops working.")
    limit_flags(create)
    ls = ksub.add_parser("list", help="Keys (prefix, state, tier, team, limits).")
    ls.add_argument("--all", action="store_true", help="Include revoked keys.")
    for name, helptext in (("show", "One key as JSON."), ("revoke", "Refuse a key from now on.")):
        ksub.add_parser(name, help=helptext).add_argument("key_id")
    rotate = ksub.add_parser("rotate", help="A new key with the same settings; the old one stops.")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace", type=float, default=0.0, help="Seconds the old key keeps working.")
    team = ksub.add_parser("team", help="Set a team's shared limits.")
    team.add_argument("team")
    limit_flags(team)
    usage = ksub.add_parser("usage", help="Requests and tokens by key, model and day.")
    usage.add_argument("--since", type=date.fromisoformat)
    usage.add_argument("--until", type=date.fromisoformat)
    usage.add_argument("--key")
