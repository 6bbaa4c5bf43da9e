"""Helpers every benchmark script shares: the CPU's name and writing one README section."""

from __future__ import annotations

import platform
from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def replace_section(start: str, end: str, block: str, *, heading: str = "") -> None:
    """Replace the README text from marker ``start`` to marker ``end`` (both part of ``block``),
    or append ``heading`` and ``block`` when the markers are missing. Nothing else changes; the
    file is read right before writing because other benchmarks write their own sections."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + heading + block + "\n"
    README.write_text(text)
