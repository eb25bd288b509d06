"""What produced a run, beyond its config: a fingerprint of the fedspine source that ran it.

A run's config names only what the user set; a default that changes between versions (the
allocator's ratio rule did on 2026-12-03) changes the run without changing its config. Each
summary therefore records this fingerprint and the strategy's resolved parameters, so a table
can say when its runs came from different code and ``--reuse`` can refuse a copy whose
resolved parameters differ.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """First 12 hex digits of the sha256 over every ``.py`` file of the package (path and bytes,
    in path order): equal fingerprints mean the same code; any edit, a comment included, changes
    it."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


__all__ = ["source_fingerprint"]
