"""Multi-tenant governance: API keys, quotas and the usage ledger."""
