"""Writing a bundle safely: a staging folder renamed into place at the end, a lock against two builds of one
folder, numbered and timed progress lines, and the files' digests."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lcmtrt.bundle import MANIFEST, file_digest
from lcmtrt.errors import UserError

log = logging.getLogger("lcmtrt.engines.build")  # progress lines under the build's name, as users see them


class Progress:
    """Numbered, timed log lines for each stage of a long build."""

    def __init__(self, total: int | None = None):
        self.total, self.done, self.started = total, 0, time.perf_counter()

    @contextmanager
    def stage(self, what: str) -> Iterator[None]:
        self.done += 1
        number = f"[{self.done}/{self.total}]" if self.total else f"[{self.done}]"
        log.info("%s %s ...", number, what)
        start = time.perf_counter()
        yield
        log.info("%s %s done in %.1f s", number, what, time.perf_counter() - start)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def digests(staging: Path) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(staging)): file_digest(p) for p in sorted(staging.rglob("*")) if p.is_file()}


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link a graph into the new bundle (no space used, the source is never written to); copy across devices."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


@contextmanager
def staged_bundle(out: Path) -> Iterator[Path]:
    """A staging folder beside `out`, renamed to `out` when the block finishes and removed if it fails: an
    interrupted build never leaves a folder that looks like a bundle. One build at a time per `out` (build_lock)."""
    with build_lock(out):  # before the staging folder, so a refused build leaves nothing behind
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            yield staging
            _replace_dir(staging, out)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """One build at a time into `out`: a second one is refused instead of interleaving its files."""
    import fcntl

    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise UserError(f"another build is writing {out} ({holder}); wait for it or choose another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)
            fcntl.flock(lock, fcntl.LOCK_UN)


def _replace_dir(staging: Path, out: Path) -> None:
    """Move the finished staging folder to `out`, replacing an older bundle only once the new one is complete."""
    if out.exists():
        if not (out / MANIFEST).is_file() and any(out.iterdir()):
            raise UserError(f"{out} exists and is not an lcmtrt bundle; choose another --out")
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
