"""The on-disk cache: reference logits, quantized variants and measured quality rows.

An entry is a directory `<cache_dir>/<kind>/<digest>/` holding its files and a `manifest.json`
that records the key the digest was made from, the code version, and the size and sha256 of
every file. The digest hashes the whole key, so an entry is only ever found by a key that
matches everything that made it (model weights hash, method and parameters, calibration set,
windows, protocol, dtype, device, torch version and quantbench's code version).

Writes are atomic: an entry is built in a temporary directory next to its final place and moved
there with one `os.replace`, manifest included, so a reader sees a whole entry or none. Readers
check every file against the manifest (size and sha256); a truncated or corrupted entry is
reported as absent and rebuilt. Builders of the same entry serialize on an `fcntl` lock file, so
several pytest-xdist workers that need the same entry build it once and share it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: builders may race, entries stay atomic
    fcntl = None  # type: ignore[assignment]

MANIFEST = "manifest.json"


def cache_dir() -> Path:
    """$QUANTBENCH_CACHE_DIR, else $XDG_CACHE_HOME/quantbench, else ~/.cache/quantbench."""
    base = os.environ.get("QUANTBENCH_CACHE_DIR")
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "quantbench"


# Modules that only present or gate figures: editing them leaves every cached figure valid.
PRESENTATION = ("bench_config.py", "cli.py", "gates.py", "plots.py", "pytest_plugin.py", "report.py", "results.py")
# What a quantized variant is made and stored by: the method registry (which imports the backends)
# and the code that saves and restores it. Their imports, followed through the package, reach the
# formats, layers and sources; not the evaluation, which measures a variant but never changes it.
VARIANT_ROOTS = ("quantbench.methods", "quantbench.persist")


@lru_cache(maxsize=None)
def code_version(*roots: str) -> str:
    """quantbench's version and a hash of the source files that make figures: with no `roots`,
    all but the PRESENTATION modules; with roots (module names), those modules and every
    quantbench module they import, directly or not (see `source_closure`). An edit to any of
    the hashed files makes new keys."""
    from . import __version__

    return f"{__version__}+{tree_hash(Path(__file__).parent, roots)}"


def tree_hash(root: Path, roots: tuple[str, ...] = ()) -> str:
    """The hash `code_version` takes of the package in directory `root`."""
    if roots:
        files = source_closure(root, roots)
    else:
        files = {q.relative_to(root).as_posix() for q in root.rglob("*.py")} - set(PRESENTATION)
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode())
        h.update((root / rel).read_bytes())
    return h.hexdigest()[:12]


def source_closure(root: Path, modules: tuple[str, ...]) -> set[str]:
    """The files (relative to the package directory `root`) of `modules` and of every module of
    the package they import, at any depth and inside functions too, read from the source with
    `ast` (nothing is imported). Importing a module runs its packages' __init__ files: they count."""
    import ast

    package = root.name

    def file_of(module: str) -> str | None:
        parts = module.split(".")[1:]
        candidates = [Path(*parts, "__init__.py")] + ([Path(*parts[:-1], parts[-1] + ".py")] if parts else [])
        return next((c.as_posix() for c in candidates if (root / c).is_file()), None)

    def with_parents(module: str) -> list[str]:
        parts = module.split(".")
        return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]

    seen: set[str] = set()
    todo = [m for module in modules for m in with_parents(module)]
    while todo:
        module = todo.pop()
        rel = file_of(module)
        if rel is None or rel in seen:
            continue
        seen.add(rel)
        here = module if rel.endswith("__init__.py") else module.rpartition(".")[0]  # the module's package
        for node in ast.walk(ast.parse((root / rel).read_text(), rel)):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                if target.split(".")[0] == package:
                    # `from pkg import name`: name may be a submodule or an attribute of pkg
                    todo += with_parents(target) + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                todo += [m for a in node.names if a.name.split(".")[0] == package for m in with_parents(a.name)]
    return seen


def digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Entry:
    kind: str
    path: Path  # the entry's directory
    manifest: dict

    @property
    def info(self) -> dict:
        """What the builder returned: small facts about the entry (e.g. quantize_seconds)."""
        return self.manifest.get("info", {})

    def file(self, name: str) -> Path:
        return self.path / name


# Entries verified in this process, by (directory, manifest mtime): hashing a large entry once is enough.
_VERIFIED: set[tuple[str, int]] = set()


def verify(path: Path) -> dict | None:
    """The entry's manifest if every file it lists is present, whole and unchanged; else None."""
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
        stamp = (str(path), mpath.stat().st_mtime_ns)
        files = manifest["files"]
        for name, meta in files.items():
            if (path / name).stat().st_size != meta["bytes"]:
                return None
        if stamp not in _VERIFIED:
            if any(_sha256_file(path / name) != meta["sha256"] for name, meta in files.items()):
                return None
            _VERIFIED.add(stamp)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # blocks while another process builds this entry
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def lookup(kind: str, key: dict) -> Entry | None:
    """The valid entry for `key`, or None (absent, partial or corrupted)."""
    path = cache_dir() / kind / digest(key)
    manifest = verify(path) if path.is_dir() else None
    return Entry(kind, path, manifest) if manifest is not None else None


def get_or_build(kind: str, key: dict, build: Callable[[Path], dict | None], label: str = "") -> Entry:
    """The entry for `key`; if there is none (or it is corrupted), `build(tmp_dir)` writes its
    files into an empty directory and returns small facts for the manifest, and the directory
    becomes the entry atomically. Only one process builds a given entry at a time."""
    found = lookup(kind, key)
    if found:
        return found
    root = cache_dir() / kind
    final = root / digest(key)
    with _locked(root / f"{final.name}.lock"):
        found = lookup(kind, key)  # another process may have built it while we waited
        if found:
            return found
        if final.exists():  # partial or corrupted: rebuild
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
        try:
            info = build(tmp) or {}
            files = {
                p.name: {"bytes": p.stat().st_size, "sha256": _sha256_file(p)}
                for p in sorted(tmp.iterdir())
                if p.is_file()
            }
            manifest = {
                "kind": kind,
                "label": label,
                "key": key,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "files": files,
                "info": info,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Entry(kind, final, json.loads((final / MANIFEST).read_text()))


def put_json(kind: str, key: dict, obj: object, label: str = "") -> Entry:
    def write(d: Path) -> None:
        (d / "value.json").write_text(json.dumps(obj, allow_nan=True))

    return get_or_build(kind, key, write, label)


def get_json(kind: str, key: dict) -> object | None:
    entry = lookup(kind, key)
    return None if entry is None else json.loads(entry.file("value.json").read_text())


@dataclass(frozen=True)
class Listed:
    kind: str
    digest: str
    label: str
    bytes: int
    created: str
    ok: bool


def entries() -> list[Listed]:
    """Every entry in the cache, whole or not (for `quantbench cache list`)."""
    out = []
    root = cache_dir()
    if not root.is_dir():
        return out
    for kind_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for d in sorted(p for p in kind_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            manifest = verify(d)
            size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
            out.append(
                Listed(kind_dir.name, d.name, (manifest or {}).get("label", "?"), size,
                       (manifest or {}).get("created", "?"), manifest is not None)
            )
    return out


def clear(kind: str | None = None) -> int:
    """Delete every entry (or every entry of one kind); returns the number of bytes freed."""
    root = cache_dir() if kind is None else cache_dir() / kind
    if not root.is_dir():
        return 0
    freed = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    shutil.rmtree(root)
    return freed
