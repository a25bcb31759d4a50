"""The engines behind one model id, kept in step with the registry without a restart.

A deployment whose `model` names an alias (`name@stable`, or a bare name for `latest`)
follows it: when a promotion, canary split or rollback changes what the alias serves,
the new version's engine starts beside the old one, traffic switches in one step once it
is up, and the old engine drains its in-flight requests before it shuts down. Requests
never see a missing model. LoRA adapters published for the served version load into
its engine as their own model ids, also while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

from models.manifest import Manifest
from models.refs import ModelRef
from models.registry import Registry
from serve.config import ModelDeploymentConfig
from serve.engine import Engine, ModelCard
from serve.errors import EngineError
from serve.factory import checkpoint_dir, create_engine
from serve.rollout import adapters_for, desired_weights, pick_version

logger = logging.getLogger(__name__)

EngineMaker = Callable[[ModelDeploymentConfig, "Registry | None", "Manifest | None"], Engine]
STATIC = 0  # key of the one engine of a deployment that does not follow an alias
RETRY_FAILED_S = 60.0  # a version whose engine failed to start is tried again after this


class LiveModel:
    """One model id: its engine(s) by version, their traffic shares and the adapters they serve."""

    in_process = True  # its engines run in this process (a replica restart restarts them)

    def __init__(
        self,
        cfg: ModelDeploymentConfig | None,
        registry: Registry | None = None,
        make_engine: EngineMaker = create_engine,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.make_engine = make_engine
        self.engines: dict[int, Engine] = {}
        self.weights: dict[int, float] = {}
        self.adapters: dict[str, tuple[int, Manifest]] = {}  # adapter id -> (engine key, manifest)
        self.draining: set[Engine] = set()
        self.last_error: str | None = None
        self._failed: tuple[dict[int, float], float] | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._drains: set[asyncio.Task[None]] = set()
        self._ref = self._followed_ref()

    @classmethod
    def static(cls, engine: Engine) -> LiveModel:
        """An engine that never changes (tests, directories, pinned versions)."""
        live = cls(None)
        live.engines = {STATIC: engine}
        live.weights = {STATIC: 100.0}
        return live

    def _followed_ref(self) -> ModelRef | None:
        cfg = self.cfg
        if cfg is None or not cfg.follow or self.registry is None or cfg.engine == "openai" or checkpoint_dir(cfg):
            return None
        try:
            ref = ModelRef.parse(cfg.model)
            if ref.alias is None:
                return None
            if cfg.engine == "fake":
                self.registry.resolve(ref)  # the fake engine also serves names the registry lacks
        except (ValueError, LookupError):
            return None
        return ref

    @property
    def following(self) -> bool:
        return self._ref is not None

    # ---- the request path ----------------------------------------------------------------
    def pick(self) -> Engine:
        """The engine for one request (by the versions' traffic shares)."""
        if len(self.weights) == 1:
            return self.engines[next(iter(self.weights))]
        return self.engines[pick_version(self.weights, random.random())]

    def adapter_engine(self, name: str) -> Engine | None:
        entry = self.adapters.get(name)
        return self.engines.get(entry[0]) if entry else None

    @property
    def primary(self) -> Engine:
        """The engine with the largest share (its card is what `/v1/models` shows)."""
        return self.engines[max(self.weights, key=lambda v: (self.weights[v], v))]

    @property
    def card(self) -> ModelCard:
        return self.primary.card

    def adapter_cards(self) -> list[ModelCard]:
        out = []
        for name, (key, manifest) in self.adapters.items():
            base = self.engines.get(key)
            if base is not None:
                out.append(base.card.model_copy(update={
                    "id": name, "root": manifest.ref, "parent": base.card.id, "created": int(manifest.created.timestamp()),
                }))
        return out

    def all_engines(self) -> list[Engine]:
        return list(self.engines.values())

    # ---- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start the engine(s) of what the registry says now; then keep following it."""
        if not self.engines:
            if self.following:
                await self.sync(initial=True)
            else:
                assert self.cfg is not None
                engine = self.make_engine(self.cfg, self.registry, None)
                await engine.start()
                self.engines, self.weights = {STATIC: engine}, {STATIC: 100.0}
                if self.cfg.lora:
                    await self._sync_adapters()
        if self.cfg is not None and (self.following or self.cfg.lora):
            self._task = asyncio.create_task(self._poll(self.cfg.registry_poll_s))

    async def _poll(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving what runs; say why once per distinct error
                message = f"{type(exc).__name__}: {exc}"
                if message != self.last_error:
                    logger.error("%s: roll-out step failed, still serving %s: %s", self.cfg and self.cfg.model,
                                 self.card.root, message)
                self.last_error = message

    async def sync(self, initial: bool = False) -> bool:
        """Bring the engines in line with the registry; True if traffic moved."""
        async with self._lock:
            moved = False
            if self._ref is not None:
                moved = await self._sync_versions(initial)
            if self.cfg is not None and self.cfg.lora:
                await self._sync_adapters()
            return moved

    async def _sync_versions(self, initial: bool) -> bool:
        assert self._ref is not None and self.registry is not None and self.cfg is not None
        name, alias = self._ref.name, self._ref.alias or ""
        desired = desired_weights(self.registry.aliases(name), self.registry.traffic(name), alias)
        if desired == self.weights:
            return False
        if self._failed and self._failed[0] == desired and time.monotonic() - self._failed[1] < RETRY_FAILED_S:
            return False
        started: dict[int, Engine] = {}
        try:
            for version in desired:
                if version not in self.engines:
                    manifest = self.registry.manifest(name, version)
                    logger.info("%s: starting %s beside %s", self.cfg.model, manifest.ref,
                                "nothing" if initial else self.card.root)
                    engine = self.make_engine(self.cfg, self.registry, manifest)
                    started[version] = engine
                    await engine.start()
                    if not initial:
                        await warm_up(engine)
        except BaseException:
            self._failed = (desired, time.monotonic())
            for engine in started.values():
                with contextlib.suppress(Exception):
                    await engine.shutdown()
            raise
        self._failed = None
        previous = dict(self.weights)
        self.engines.update(started)
        self.weights = desired  # one assignment: the next request sees the new split
        self.last_error = None
        for version in [v for v in self.engines if v not in desired]:
            self._drain(self.engines.pop(version))
        self.adapters = {k: v for k, v in self.adapters.items() if v[0] in self.engines}
        if not initial:
            logger.warning("%s: traffic %s -> %s", self.cfg.model, _shares(name, previous), _shares(name, desired))
        return True

    async def _sync_adapters(self) -> None:
        assert self.registry is not None
        wanted: dict[str, tuple[int, Manifest]] = {}
        manifests = [m for m in self.registry.list() if m.format == "lora"]
        for key, engine in self.engines.items():
            for adapter, manifest in adapters_for(engine.card.root or "", manifests).items():
                wanted[adapter] = (key, manifest)
        for adapter, (key, manifest) in wanted.items():
            current = self.adapters.get(adapter)
            if current and current[0] == key and current[1].version == manifest.version:
                continue
            engine = self.engines[key]
            if current and current[0] == key:
                await engine.unload_adapter(adapter)
            await engine.load_adapter(adapter, str(self.registry.local_path(manifest)))
            self.adapters[adapter] = (key, manifest)
            logger.warning("%s: serving adapter %s (%s)", engine.card.root, adapter, manifest.ref)
        for adapter in [a for a in self.adapters if a not in wanted]:
            key, _ = self.adapters.pop(adapter)
            if key in self.engines:
                await self.engines[key].unload_adapter(adapter)

    def _drain(self, engine: Engine) -> None:
        self.draining.add(engine)
        task = asyncio.create_task(self._drain_then_stop(engine))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain_then_stop(self, engine: Engine) -> None:
        timeout = self.cfg.drain_timeout_s if self.cfg else 0.0
        deadline = time.monotonic() + timeout
        while engine.busy() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if engine.busy() > 0:
            logger.warning("%s: %d requests still running after %.0fs of draining; stopping it", engine.card.root,
                           engine.busy(), timeout)
        try:
            await engine.shutdown()
        finally:
            self.draining.discard(engine)
        logger.warning("%s: drained and stopped", engine.card.root)

    async def readiness(self) -> bool:
        try:
            for version in self.weights:
                await self.engines[version].check_health()
        except EngineError:
            return False
        return True

    async def stop_polling(self) -> None:
        """Stop following the registry (or, for a mirror, the replicas)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def shutdown(self) -> None:
        await self.stop_polling()
        for task in list(self._drains):
            task.cancel()
        for engine in [*self.engines.values(), *self.draining]:
            with contextlib.suppress(Exception):
                await engine.shutdown()
        self.engines.clear()
        self.draining.clear()


async def warm_up(engine: Engine) -> None:
    """One short request before traffic arrives: a fresh engine's first batch is its slowest (kernels compile)."""
    body = {"model": engine.card.id, "prompt": "warm up", "max_tokens": 4, "temperature": 0}
    await engine.generate("completion", body, f"warmup-{time.monotonic_ns()}")


def _shares(name: str, weights: dict[int, float]) -> str:
    return ", ".join(f"{name}@{v} {w:g}%" for v, w in sorted(weights.items())) or "none"
