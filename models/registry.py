"""The model registry: versioned, checksummed artifacts with aliases and atomic publish.

Layout under the registry root (a local directory or any fsspec URL)::

    <name>/versions/<N>/manifest.json   # written last: a version exists once this exists
    <name>/versions/<N>/<files...>
    <name>/aliases.json                 # {"stable": 3, ...}; "latest" is derived
    <name>/history.json                 # every alias change, newest last (promote / rollback)
    <name>/traffic.json                 # {"canary": {"percent": 10, "of": "stable"}}: a canary split
    <name>/.staging/<token>/            # work area of a publish in progress

``publish`` copies into a staging directory, verifies every checksum, then moves the
directory into place with one rename on a local disk (atomic: readers never see a
half-written version, also when interrupted). On object stores, where no rename is
atomic, the manifest is copied last and is what makes the version visible.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import posixpath
import secrets
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from models.manifest import (
    MANIFEST_FILE,
    ArtifactFormat,
    FileEntry,
    Manifest,
    Variant,
    validate_alias,
    validate_name,
)
from models.refs import LATEST, ModelRef

_CHUNK = 1 << 20
STAGING_MAX_AGE_S = 24 * 3600


class RegistryError(Exception):
    """Base class of registry errors."""


class ModelNotFound(RegistryError, LookupError):
    """The name, version or alias does not exist."""


class ChecksumMismatch(RegistryError):
    """A file's bytes do not match its manifest."""


def sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _iter_source_files(src: Path) -> Iterable[Path]:
    for p in sorted(src.rglob("*")):
        if p.is_file() and p.name != MANIFEST_FILE and ".staging" not in p.parts:
            yield p


class Registry:
    """A model registry rooted at a local directory or an fsspec URL."""

    def __init__(self, root: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> None:
        root_str = os.fspath(root)
        self.fs, path = fsspec.core.url_to_fs(root_str)
        self.root = path.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self.root = str(Path(self.root).resolve())
            os.makedirs(self.root, exist_ok=True)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.url = root_str

    # ---- paths -------------------------------------------------------------------------
    def _model_dir(self, name: str) -> str:
        return posixpath.join(self.root, validate_name(name))

    def _version_dir(self, name: str, version: int) -> str:
        return posixpath.join(self._model_dir(name), "versions", str(version))

    def _aliases_path(self, name: str) -> str:
        return posixpath.join(self._model_dir(name), "aliases.json")

    # ---- reading -----------------------------------------------------------------------
    def names(self) -> list[str]:
        """All model names that have at least one published version."""
        found: set[str] = set()
        pattern = posixpath.join(self.root, "**", "versions", "*", MANIFEST_FILE)
        for p in self.fs.glob(pattern):
            rel = posixpath.relpath(p, self.root)
            name = rel.split("/versions/")[0]
            if ".staging" not in name:
                found.add(name)
        return sorted(found)

    def versions(self, name: str) -> list[int]:
        """Published version numbers of ``name``, ascending."""
        vdir = posixpath.join(self._model_dir(name), "versions")
        out = []
        for p in self.fs.glob(posixpath.join(vdir, "*", MANIFEST_FILE)):
            v = posixpath.basename(posixpath.dirname(p))
            if v.isdigit():
                out.append(int(v))
        return sorted(out)

    def manifest(self, name: str, version: int) -> Manifest:
        path = posixpath.join(self._version_dir(name, version), MANIFEST_FILE)
        try:
            with self.fs.open(path, "rb") as f:
                return Manifest.model_validate_json(f.read())
        except FileNotFoundError:
            raise ModelNotFound(f"model {name}@{version} not found") from None

    def aliases(self, name: str) -> dict[str, int]:
        """Aliases of ``name``, including the derived ``latest``."""
        out = {str(k): int(v) for k, v in self._read_json(self._aliases_path(name), {}).items()}
        versions = self.versions(name)
        if versions:
            out[LATEST] = versions[-1]
        return out

    def resolve(self, ref: str | ModelRef) -> Manifest:
        """Resolve ``name``, ``name@3`` or ``name@alias`` to a manifest."""
        r = ModelRef.parse(ref) if isinstance(ref, str) else ref
        if r.version is not None:
            return self.manifest(r.name, r.version)
        aliases = self.aliases(r.name)
        if not aliases:
            raise ModelNotFound(f"model {r.name!r} not found")
        assert r.alias is not None
        if r.alias not in aliases:
            raise ModelNotFound(f"model {r.name!r} has no alias {r.alias!r}")
        return self.manifest(r.name, aliases[r.alias])

    def list(self) -> list[Manifest]:
        """Every published version of every model."""
        return [self.manifest(n, v) for n in self.names() for v in self.versions(n)]

    def version_path(self, manifest: Manifest) -> str:
        """Where the files of ``manifest`` live (a path on the registry's filesystem)."""
        return self._version_dir(manifest.name, manifest.version)

    def local_path(self, ref: str | ModelRef | Manifest, verify: bool = False) -> Path:
        """A local directory holding the version's files (downloaded to the cache if remote)."""
        m = ref if isinstance(ref, Manifest) else self.resolve(ref)
        src = self.version_path(m)
        if self.is_local:
            if verify:
                self.verify(m)
            return Path(src)
        if self.cache_dir is None:
            raise RegistryError("a remote registry needs a cache_dir to materialise versions")
        dest = self.cache_dir / m.name / str(m.version)
        if (dest / MANIFEST_FILE).exists():
            return dest
        tmp = self.cache_dir / ".tmp" / secrets.token_hex(8)
        tmp.mkdir(parents=True)
        local = LocalFileSystem()
        for entry in m.files:
            target = tmp / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get(posixpath.join(src, entry.path), str(target))
            digest, size = sha256_file(local, str(target))
            if digest != entry.sha256 or size != entry.size:
                raise ChecksumMismatch(f"{m.ref}: {entry.path} does not match its manifest")
        (tmp / MANIFEST_FILE).write_text(m.model_dump_json(indent=2))
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process materialised it first
            pass
        return dest

    def verify(self, manifest: Manifest) -> None:
        """Re-hash every file of a version; raise ChecksumMismatch on any difference."""
        base = self.version_path(manifest)
        for entry in manifest.files:
            try:
                digest, size = sha256_file(self.fs, posixpath.join(base, entry.path))
            except FileNotFoundError:
                raise ChecksumMismatch(f"{manifest.ref}: {entry.path} is missing") from None
            if digest != entry.sha256 or size != entry.size:
                raise ChecksumMismatch(f"{manifest.ref}: {entry.path} does not match its manifest")

    # ---- writing -----------------------------------------------------------------------
    def publish(
        self,
        name: str,
        source: str | os.PathLike[str],
        *,
        format: ArtifactFormat = "hf",
        quantization: str | None = None,
        base_model: str | None = None,
        metrics: dict[str, float] | None = None,
        metadata: dict[str, Any] | None = None,
        aliases: Iterable[str] = (),
        variants: Iterable[Variant] = (),
    ) -> Manifest:
        """Publish the files of local directory ``source`` as the next version of ``name``."""
        validate_name(name)
        for a in aliases:
            validate_alias(a)
        src = Path(source)
        if not src.is_dir():
            raise RegistryError(f"{src} is not a directory")
        files = list(_iter_source_files(src))
        if not files:
            raise RegistryError(f"{src} holds no files")
        model_dir = self._model_dir(name)
        self.gc_staging(name)  # what a publish killed mid-copy (kill -9, a lost node) left behind
        staging = posixpath.join(model_dir, ".staging", f"{int(time.time())}-{secrets.token_hex(6)}")
        self.fs.makedirs(staging, exist_ok=True)
        try:
            entries = self._stage_files(src, files, staging)
            draft = Manifest(
                name=name,
                version=1,
                format=format,
                quantization=quantization,
                base_model=base_model,
                files=entries,
                metrics=metrics or {},
                metadata=metadata or {},
                variants=self._sized(list(variants), entries),
            )
            manifest = self._commit(draft, staging)
        except OSError as exc:  # a full disk, a failing write: said in one line, with nothing published
            self._remove(staging)
            raise RegistryError(f"publishing {name} failed and nothing was published: {exc}") from exc
        except BaseException:
            self._remove(staging)
            raise
        for a in aliases:
            self.set_alias(name, a, manifest.version)
        return manifest

    def _stage_files(self, src: Path, files: builtins.list[Path], staging: str) -> builtins.list[FileEntry]:
        local = LocalFileSystem()
        entries = []
        for p in files:
            rel = p.relative_to(src).as_posix()
            digest, size = sha256_file(local, str(p))
            dest = posixpath.join(staging, rel)
            self.fs.makedirs(posixpath.dirname(dest), exist_ok=True)
            self.fs.put_file(str(p), dest)
            entries.append(FileEntry(path=rel, sha256=digest, size=size))
        # Verify what landed in staging, not what we meant to write.
        for e in entries:
            digest, size = sha256_file(self.fs, posixpath.join(staging, e.path))
            if digest != e.sha256 or size != e.size:
                raise ChecksumMismatch(f"staged copy of {e.path} does not match its source")
        return entries

    @staticmethod
    def _sized(variants: builtins.list[Variant], entries: builtins.list[FileEntry]) -> builtins.list[Variant]:
        """Variants with their sizes; each must name a directory that holds files."""
        out = []
        for v in variants:
            prefix = f"{v.path.strip('/')}/" if v.path.strip("/") else ""
            inside = [e for e in entries if e.path.startswith(prefix)]
            if prefix:
                size = sum(e.size for e in inside)
            else:  # the root variant: everything outside the other variants' directories
                others = tuple(f"{o.path.strip('/')}/" for o in variants if o.path.strip("/"))
                size = sum(e.size for e in entries if not e.path.startswith(others))
            if not inside:
                raise RegistryError(f"variant {v.name!r} has no files under {v.path!r}")
            out.append(v.model_copy(update={"size": size}))
        names = [v.name for v in out]
        if len(names) != len(set(names)):
            raise RegistryError("variant names must be unique")
        return out

    def _commit(self, draft: Manifest, staging: str) -> Manifest:
        versions_dir = posixpath.join(self._model_dir(draft.name), "versions")
        self.fs.makedirs(versions_dir, exist_ok=True)
        for _ in range(100):
            existing = self.versions(draft.name)
            version = (existing[-1] + 1) if existing else 1
            manifest = draft.model_copy(update={"version": version, "created": datetime.now(UTC)})
            target = posixpath.join(versions_dir, str(version))
            if self.is_local:
                with open(posixpath.join(staging, MANIFEST_FILE), "w") as f:
                    f.write(manifest.model_dump_json(indent=2))
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.rename(staging, target)  # atomic; fails if the version exists
                except OSError:
                    if os.path.exists(target):
                        continue  # a concurrent publish took this number
                    raise
                self._remove_if_empty(posixpath.dirname(staging))
                return manifest
            if self.fs.exists(target):
                continue
            for e in manifest.files:
                self.fs.copy(posixpath.join(staging, e.path), posixpath.join(target, e.path))
            with self.fs.open(posixpath.join(target, MANIFEST_FILE), "wb") as f:
                f.write(manifest.model_dump_json(indent=2).encode())
            self._remove(staging)
            return manifest
        raise RegistryError(f"could not allocate a version for {draft.name}")

    def set_alias(self, name: str, alias: str, version: int, *, action: str = "set") -> int | None:
        """Point ``alias`` at ``version`` (atomically replaces the alias file); returns the previous version."""
        validate_alias(alias)
        if alias == LATEST:
            raise RegistryError("'latest' is derived from the newest version and cannot be set")
        if version not in self.versions(name):
            raise ModelNotFound(f"model {name}@{version} not found")
        current = {k: v for k, v in self.aliases(name).items() if k != LATEST}
        previous = current.get(alias)
        current[alias] = version
        self._write_json_atomic(self._aliases_path(name), current)
        self._record(name, {"alias": alias, "version": version, "previous": previous, "action": action})
        return previous

    def remove_alias(self, name: str, alias: str) -> None:
        current = {k: v for k, v in self.aliases(name).items() if k != LATEST}
        previous = current.pop(alias, None)
        if previous is None:
            raise ModelNotFound(f"model {name!r} has no alias {alias!r}")
        self._write_json_atomic(self._aliases_path(name), current)
        self._record(name, {"alias": alias, "version": None, "previous": previous, "action": "remove"})

    # ---- roll-outs -----------------------------------------------------------------------
    def history(self, name: str) -> builtins.list[dict[str, Any]]:
        """Every alias change of ``name``, oldest first."""
        return list(self._read_json(posixpath.join(self._model_dir(name), "history.json"), []))

    def traffic(self, name: str) -> dict[str, dict[str, Any]]:
        """Canary splits: ``{canary_alias: {"percent": p, "of": alias}}``."""
        return dict(self._read_json(posixpath.join(self._model_dir(name), "traffic.json"), {}))

    def promote(self, name: str, version: int, alias: str = "stable") -> int | None:
        """Move ``alias`` to ``version``; a canary of that alias ends. Returns the previous version."""
        self.clear_canary(name, of=alias)
        return self.set_alias(name, alias, version, action="promote")

    def set_canary(self, name: str, version: int, percent: float, of: str = "stable", alias: str = "canary") -> None:
        """Send ``percent`` of the traffic of ``name@of`` to ``version`` (through alias ``alias``)."""
        if not 0 < percent < 100:
            raise RegistryError("a canary takes between 0 and 100 percent of the traffic")
        if of not in self.aliases(name):
            raise ModelNotFound(f"model {name!r} has no alias {of!r} to split")
        self.set_alias(name, alias, version, action="canary")
        split = {k: v for k, v in self.traffic(name).items() if v.get("of") != of}
        split[alias] = {"percent": float(percent), "of": of}
        self._write_json_atomic(posixpath.join(self._model_dir(name), "traffic.json"), split)

    def clear_canary(self, name: str, of: str = "stable") -> None:
        """End the canary split of ``name@of`` (its alias stays, pointing where it did)."""
        split = self.traffic(name)
        kept = {k: v for k, v in split.items() if v.get("of") != of}
        if kept != split:
            self._write_json_atomic(posixpath.join(self._model_dir(name), "traffic.json"), kept)

    def rollback(self, name: str, alias: str = "stable") -> int:
        """Return ``alias`` to the version it had before its last promotion; returns that version."""
        target = rollback_target(self.history(name), alias)
        if target is None:
            raise RegistryError(f"{name}@{alias} has no earlier version to roll back to")
        self.clear_canary(name, of=alias)
        self.set_alias(name, alias, target, action="rollback")
        return target

    def _record(self, name: str, entry: dict[str, Any]) -> None:
        path = posixpath.join(self._model_dir(name), "history.json")
        entries = self.history(name)
        entries.append({**entry, "at": datetime.now(UTC).isoformat()})
        self._write_json_atomic(path, entries)

    def _read_json(self, path: str, default: Any) -> Any:
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return default

    def gc_staging(self, name: str, max_age_s: float = STAGING_MAX_AGE_S) -> int:
        """Remove `name`'s staging directories older than `max_age_s` (left by interrupted publishes; a younger
        one may be a publish still running elsewhere); returns how many."""
        removed = 0
        now = time.time()
        for d in self.fs.glob(posixpath.join(self._model_dir(name), ".staging", "*")):
            stamp = posixpath.basename(d).split("-")[0]
            if stamp.isdigit() and now - int(stamp) > max_age_s:
                self._remove(d)
                removed += 1
        return removed

    def _write_json_atomic(self, path: str, data: Any) -> None:
        payload = json.dumps(data, indent=2, sort_keys=True).encode()
        if self.is_local:
            tmp = f"{path}.{secrets.token_hex(4)}.tmp"
            with open(tmp, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "wb") as f:
                f.write(payload)

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def _remove_if_empty(self, path: str) -> None:
        try:
            os.rmdir(path)
        except OSError:
            pass


def rollback_target(history: list[dict[str, Any]], alias: str) -> int | None:
    """The version ``alias`` returns to on rollback: promotions stack up, rollbacks pop them.

    A pure function of the alias history (oldest first): ``set``/``promote`` push the new
    version, ``rollback`` pops one, ``remove`` clears. The target is the entry below the top.
    """
    stack: list[int] = []
    for e in history:
        if e.get("alias") != alias:
            continue
        action, version = e.get("action", "set"), e.get("version")
        if action == "rollback":
            if stack:
                stack.pop()
            if version is not None and (not stack or stack[-1] != version):  # written by hand, or a lost entry
                stack.append(int(version))
        elif action == "remove" or version is None:
            stack.clear()
        elif not stack or stack[-1] != version:
            stack.append(int(version))
    return stack[-2] if len(stack) >= 2 else None
