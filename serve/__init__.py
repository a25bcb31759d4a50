"""Ray Serve deployments around an engine (vLLM or the deterministic fake).

Heavy imports (ray, vllm, torch) happen inside the modules that need them.
"""
