"""Process memory as the kernel and the C allocator see it (Linux/glibc; elsewhere the readers return 0/False).

Used by `bench` (peak per objective), `plan --measure` (training-phase peak) and `merge` (peak while exporting):

  rss(key)           a /proc/self/status figure in bytes: VmRSS (now), VmHWM (peak), RssAnon, RssFile
  reset_peak()       set VmHWM back to the current RSS (Linux >= 4.0), so the next peak is this phase's own
  trim_heap()        malloc_trim(0): hand free heap pages back, so their reuse shows up in RSS again
  mmap_threshold(n)  serve allocations >= n bytes by mmap (returned to the OS on free; glibc's dynamic
                     threshold off), so RSS follows live tensors rather than the heap's high-water mark
  MemoryMonitor      peak RSS and peak anonymous RSS of a `with` block, sampled by a thread
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def proc_status() -> dict[str, int]:
    """The STATUS_KEYS figures of /proc/self/status in bytes (empty where there is no /proc)."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in STATUS_KEYS:
                out[key] = int(val.split()[0]) * 1024
    return out


def rss(key: str = "VmRSS") -> int:
    """One /proc/self/status figure in bytes; 0 where it cannot be read."""
    return proc_status().get(key, 0)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it (the peak is then lifetime)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


_LIBC: Any = None


def _libc() -> Any:
    """glibc, or False (macOS, musl: the allocator calls below then do nothing)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def trim_heap() -> None:
    """Give free heap pages back to the OS (glibc keeps them, e.g. after a forward pass raised its mmap
    threshold, so freed temporaries would otherwise add up in RSS)."""
    if _libc():
        _libc().malloc_trim(0)


def mmap_threshold(nbytes: int) -> bool:
    """Serve new allocations >= nbytes by mmap (M_MMAP_THRESHOLD; also turns off glibc's dynamic threshold)."""
    return bool(_libc()) and bool(_libc().mallopt(-3, nbytes))


class MemoryMonitor:
    """Peak RSS of this process while active (the high-water mark is reset on entry), plus the peak of its
    anonymous part: memory-mapped weights count in RSS but are file pages the kernel can drop at will."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_anon = 0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        st = proc_status()
        self.peak_anon = max(self.peak_anon, st.get("RssAnon", 0))
        self.peak_rss = max(self.peak_rss, st.get("VmRSS", 0))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> MemoryMonitor:
        reset_peak()
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        hwm = rss("VmHWM")
        if not hwm:
            import resource
            import sys

            ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            hwm = ru if sys.platform == "darwin" else ru * 1024
        self.peak_rss = max(self.peak_rss, hwm)
