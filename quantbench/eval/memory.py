"""Process memory: resident set now, and its peak since the last reset.

On Linux the kernel keeps the high-water mark of the resident set (VmHWM) and lets a process
reset it by writing 5 to /proc/self/clear_refs; elsewhere a sampling thread stands in.
"""

from __future__ import annotations

import threading
from pathlib import Path

import psutil

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def _vm_hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakRSS:
    """Context manager measuring the peak resident set inside its block.

        with PeakRSS() as peak:
            ...
        peak.bytes       # high-water mark during the block
        peak.start_bytes # resident set when the block began
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.bytes = 0
        self.start_bytes = 0
        self._kernel = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        self.start_bytes = rss_bytes()
        try:
            _CLEAR.write_text("5")
            self._kernel = _vm_hwm() is not None
        except OSError:
            self._kernel = False
        if not self._kernel:
            self.bytes = self.start_bytes
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.bytes = max(self.bytes, rss_bytes())

    def __exit__(self, *exc) -> None:
        if self._kernel:
            self.bytes = max(_vm_hwm() or 0, rss_bytes())
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.bytes = max(self.bytes, rss_bytes())
