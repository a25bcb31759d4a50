"""Multi-tenant governance: API keys, quotas, routing and the usage ledger."""
