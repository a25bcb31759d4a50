"""The registry: publish, resolve, aliases, atomicity, fsspec backends."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from models.manifest import MANIFEST_FILE
from models.refs import ModelRef
from models.registry import ChecksumMismatch, ModelNotFound, Registry, RegistryError


def make_checkpoint(path: Path, payload: bytes = b"weights") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(payload)
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "extra.txt").write_text("x")
    return path


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry", cache_dir=tmp_path / "cache")


def test_publish_assigns_versions_and_checksums(reg: Registry, tmp_path: Path) -> None:
    src = make_checkpoint(tmp_path / "ckpt")
    m1 = reg.publish("org/model", src)
    m2 = reg.publish("org/model", make_checkpoint(tmp_path / "ckpt2", b"other"))
    assert (m1.version, m2.version) == (1, 2)
    assert {f.path for f in m1.files} == {"config.json", "model.safetensors", "sub/extra.txt"}
    import hashlib

    weights = next(f for f in m1.files if f.path == "model.safetensors")
    assert weights.sha256 == hashlib.sha256(b"weights").hexdigest()
    assert reg.versions("org/model") == [1, 2]
    assert reg.names() == ["org/model"]
    reg.verify(m1)


def test_resolve_name_version_alias(reg: Registry, tmp_path: Path) -> None:
    reg.publish("m", make_checkpoint(tmp_path / "a"), aliases=["stable"])
    reg.publish("m", make_checkpoint(tmp_path / "b", b"v2"))
    assert reg.resolve("m").version == 2  # bare name = latest
    assert reg.resolve("m@latest").version == 2
    assert reg.resolve("m@1").version == 1
    assert reg.resolve("m@stable").version == 1
    reg.set_alias("m", "stable", 2)
    assert reg.resolve("m@stable").version == 2
    reg.remove_alias("m", "stable")
    with pytest.raises(ModelNotFound):
        reg.resolve("m@stable")
    with pytest.raises(ModelNotFound):
        reg.resolve("m@7")
    with pytest.raises(ModelNotFound):
        reg.resolve("nope")
    with pytest.raises(ModelNotFound):
        reg.set_alias("m", "canary", 9)
    with pytest.raises(RegistryError):
        reg.set_alias("m", "latest", 1)


@pytest.mark.parametrize("bad", ["", "a/b/c", "-x", "m@0", "m@", "m@1x!", "bad name"])
def test_bad_references_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        ModelRef.parse(bad)


def test_interrupted_publish_leaves_no_version(reg: Registry, tmp_path: Path, monkeypatch) -> None:
    src = make_checkpoint(tmp_path / "ckpt")
    calls = {"n": 0}
    original = reg.fs.put_file

    def flaky_put(lpath, rpath, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # interrupted half-way through copying
        return original(lpath, rpath, **kw)

    monkeypatch.setattr(reg.fs, "put_file", flaky_put)
    with pytest.raises(KeyboardInterrupt):
        reg.publish("m", src)
    assert reg.versions("m") == []
    assert not list((Path(reg.root) / "m").rglob("model.safetensors"))
    monkeypatch.undo()
    assert reg.publish("m", src).version == 1


def test_corrupted_staging_copy_is_refused(reg: Registry, tmp_path: Path, monkeypatch) -> None:
    src = make_checkpoint(tmp_path / "ckpt")
    original = reg.fs.put_file

    def corrupting_put(lpath, rpath, **kw):
        original(lpath, rpath, **kw)
        with open(rpath, "ab") as f:
            f.write(b"!")

    monkeypatch.setattr(reg.fs, "put_file", corrupting_put)
    with pytest.raises(ChecksumMismatch):
        reg.publish("m", src)
    assert reg.versions("m") == []


def test_verify_detects_tampering(reg: Registry, tmp_path: Path) -> None:
    m = reg.publish("m", make_checkpoint(tmp_path / "ckpt"))
    (Path(reg.version_path(m)) / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ChecksumMismatch):
        reg.verify(m)


def test_concurrent_publishes_get_distinct_versions(reg: Registry, tmp_path: Path) -> None:
    srcs = [make_checkpoint(tmp_path / f"c{i}", f"w{i}".encode()) for i in range(6)]
    out: list[int] = []
    threads = [threading.Thread(target=lambda s=s: out.append(reg.publish("m", s).version)) for s in srcs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out) == [1, 2, 3, 4, 5, 6]
    for v in out:
        reg.verify(reg.manifest("m", v))


def test_fsspec_registry_materialises_verified_copy(tmp_path: Path) -> None:
    remote = Registry("memory://raygate-test-registry", cache_dir=tmp_path / "cache")
    m = remote.publish("org/m", make_checkpoint(tmp_path / "ckpt"), aliases=["stable"])
    assert remote.resolve("org/m@stable").version == m.version
    local = remote.local_path("org/m@stable")
    assert (local / "model.safetensors").read_bytes() == b"weights"
    assert (local / MANIFEST_FILE).exists()
    remote.fs.rm(remote.root, recursive=True)


def test_publish_refuses_empty_or_missing_source(reg: Registry, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError):
        reg.publish("m", tmp_path / "empty")
    with pytest.raises(RegistryError):
        reg.publish("m", tmp_path / "missing")


def test_a_publish_clears_what_an_interrupted_one_left_in_staging(reg: Registry, tmp_path: Path) -> None:
    import time

    from models.registry import STAGING_MAX_AGE_S

    staging = Path(reg.root) / "m" / ".staging"
    stale = staging / f"{int(time.time() - STAGING_MAX_AGE_S - 60)}-dead00000000"
    running = staging / f"{int(time.time())}-live00000000"  # a publish in progress elsewhere: kept
    for d in (stale, running):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"half a copy")
    assert reg.publish("m", make_checkpoint(tmp_path / "ckpt")).version == 1
    assert not stale.exists() and running.exists()
    assert reg.versions("m") == [1]


def test_a_write_failing_during_publish_publishes_nothing_and_moves_no_alias(tmp_path: Path) -> None:
    """A real failed write, not a patched one: `raygate models add` under a 1 MB file-size limit (the kernel
    refuses the write past it, as a full disk would) with a 3 MB weights file."""
    import resource
    import signal
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("raygate")
    home = tmp_path / "home"

    def add(src: Path, limit: int | None = None) -> subprocess.CompletedProcess[str]:
        def cap() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as ENOSPC does
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        return subprocess.run([str(exe), "--home", str(home), "models", "add", "m", str(src), "--alias", "stable"],
                              capture_output=True, text=True, timeout=120, preexec_fn=cap if limit else None)

    assert add(make_checkpoint(tmp_path / "v1")).returncode == 0
    failed = add(make_checkpoint(tmp_path / "v2", payload=b"w" * 3_000_000), limit=1_000_000)
    assert failed.returncode == 2, failed.stderr
    assert failed.stderr.startswith("raygate: publishing m failed and nothing was published")
    assert len(failed.stderr.strip().splitlines()) == 1
    reg = Registry(home / "registry")
    assert reg.versions("m") == [1] and reg.aliases("m") == {"stable": 1, "latest": 1}
    assert not [p for p in (home / "registry").rglob("*") if p.is_file() and p.stat().st_size >= 1_000_000]
