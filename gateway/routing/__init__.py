"""Where a request goes, as pure policies tested without a server.

- `routes`: a route name → the models to try, in order (a weighted pick, the other targets, fallbacks),
  and a key tier → vLLM's request priority.
- `affinity`: a conversation → the gateway replica whose engine cached its prefix (rendezvous hashing,
  passed over when too busy).
- `replica_router`: Serve's request router and HAProxy's router deployment that apply `affinity`.

Which version of a model serves a request (canary splits, roll-outs) is `serve/rollout.py`'s, below the
gateway; both weighted picks are its `weighted_choice`.
"""
