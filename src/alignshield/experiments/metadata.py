"""What a results row records about where and how a run was computed: library versions, the git
revision, the host, and the peak memory of the run."""

from __future__ import annotations

import importlib.metadata
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "alignshield")


# ------------------------------------------------------------------------- run metadata


def environment() -> dict[str, Any]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    return {"versions": versions, "git_revision": git_revision(), "host": platform.node()}


def git_revision() -> str | None:
    """The commit of the alignshield source tree (``+dirty`` with uncommitted changes), or None
    when the package is not in a git checkout (installed from a wheel) or git is missing."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "") if rev else None


def reset_peak_memory() -> str:
    """Reset the peak-RSS counter where Linux allows it; returns the scope the next reading covers."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    except Exception:  # noqa: BLE001
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, which ru_maxrss reads
        return "run"
    except OSError:
        return "process"  # ru_maxrss is then the peak since the sweep process started


def peak_memory() -> tuple[float, float | None]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    except Exception:  # noqa: BLE001
        pass
    return round(rss_mb, 1), gpu
