"""What else the machine is doing while a benchmark runs, shared by the benchmark scripts."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path


class CpuMeter:
    """Busy CPU time of the whole machine (/proc/stat) against this process's and its waited-for
    children's CPU time: the difference is what other jobs used while the benchmark ran."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.ours0 = time.perf_counter(), self._busy(), self._ours()

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours() -> float:
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    def read(self) -> dict[str, float | None]:
        wall = time.perf_counter() - self.t0
        busy = self._busy()
        ours = self._ours() - self.ours0
        if busy is None or self.busy0 is None or wall <= 0:
            return {"wall_s": wall, "ours_cores": ours / wall if wall > 0 else None, "others_cores": None}
        return {"wall_s": wall, "ours_cores": ours / wall, "others_cores": max(0.0, (busy - self.busy0 - ours) / wall)}
