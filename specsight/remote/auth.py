"""API keys for ``specsight serve``: stored only as sha256 hashes, checked in constant time.

A keys file holds one ``name:sha256hex`` line per key (``#`` comments and blank lines are
ignored); ``name`` is the owner of the jobs submitted with that key, and several keys may share
a name (key rotation). ``specsight hash-key`` prints such a line. The environment variable
``SPECSIGHT_API_KEYS`` may hold the same entries separated by commas.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

__all__ = ["ENV_VAR", "INSECURE_OWNER", "KeyRing", "KeyFileError", "generate_key", "hash_key"]

ENV_VAR = "SPECSIGHT_API_KEYS"
#: the owner of every job on a server started with ``--insecure-no-auth``
INSECURE_OWNER = "anonymous"
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_HEX = re.compile(r"[0-9a-f]{64}")


class KeyFileError(ValueError):
    """A keys file or ``SPECSIGHT_API_KEYS`` entry is malformed."""


def hash_key(raw: str) -> str:
    """The sha256 hex digest of a raw API key (what a keys file stores)."""
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def generate_key() -> str:
    """A fresh random API key (256 bits, URL-safe)."""
    return "ss_" + secrets.token_urlsafe(32)


def _parse_entry(text: str, where: str) -> tuple[str, str]:
    name, sep, digest = text.strip().partition(":")
    name, digest = name.strip(), digest.strip().lower()
    if not sep or not _NAME.fullmatch(name) or not _HEX.fullmatch(digest):
        raise KeyFileError(
            f"{where}: expected 'name:sha256hex' (name of letters, digits, _ . @ -; "
            "64 hex digits), e.g. the output of `specsight hash-key`"
        )
    return name, digest


class KeyRing:
    """The hashed keys a server accepts; :meth:`authenticate` maps a raw key to its owner."""

    def __init__(self, entries: Iterable[tuple[str, str]] = (), *, insecure: bool = False):
        self._entries: list[tuple[str, bytes]] = []
        for name, digest in entries:
            name, digest = _parse_entry(f"{name}:{digest}", "key entry")
            self._entries.append((name, digest.encode("ascii")))
        self.insecure = insecure

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def owners(self) -> list[str]:
        return sorted({name for name, _ in self._entries})

    # --- construction ------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str, *, source: str = "<keys>") -> KeyRing:
        """Entries from the text of a keys file (one ``name:sha256hex`` per line)."""
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if line:
                entries.append(_parse_entry(line, f"{source}:{number}"))
        return cls(entries)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KeyRing:
        return cls.parse(Path(path).read_text(encoding="utf-8"), source=str(path))

    @classmethod
    def from_env(cls, value: str | None = None) -> KeyRing:
        """Entries from ``SPECSIGHT_API_KEYS`` (``name:sha256hex,name2:...``)."""
        text = os.environ.get(ENV_VAR, "") if value is None else value
        parts = [p for p in text.split(",") if p.strip()]
        return cls(_parse_entry(p, f"{ENV_VAR} entry {i}") for i, p in enumerate(parts, 1))

    @classmethod
    def from_raw_keys(cls, keys: dict[str, str]) -> KeyRing:
        """From ``{owner: raw key}`` (tests, or keys held in memory); only hashes are kept."""
        return cls((name, hash_key(raw)) for name, raw in keys.items())

    @classmethod
    def allow_all(cls) -> KeyRing:
        """Accept any key, or none, as :data:`INSECURE_OWNER` (``--insecure-no-auth``)."""
        return cls(insecure=True)

    # --- checking ----------------------------------------------------------------------

    def authenticate(self, raw: str | None) -> str | None:
        """The owner of ``raw``, or None. Every stored hash is compared, in constant time.

        The owner is the key's name: keys listed under one name (a rotation: old and new key)
        share that owner's jobs; keys under different names never see each other's jobs."""
        if self.insecure:
            return INSECURE_OWNER
        if not raw:
            return None
        presented = hash_key(raw).encode("ascii")
        owner: str | None = None
        for name, digest in self._entries:
            match = hmac.compare_digest(presented, digest)  # no early exit on a match
            owner = name if match and owner is None else owner
        return owner
