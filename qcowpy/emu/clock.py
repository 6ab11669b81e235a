"""The virtual clock (QEMU_CLOCK_VIRTUAL) and its timers.

There is no CPU, so time moves only when the guest side asks (qtest's ``clock_step``/``clock_set``).
Devices that act "later" in QEMU, like edu's DMA engine, arm a timer here and run when it fires.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Callable, Optional


class Timer:
    """A one-shot timer; re-arm with :meth:`mod`, cancel with :meth:`delete`."""

    def __init__(self, clock: "VirtualClock", callback: Callable[[], None]) -> None:
        self.clock = clock
        self.callback = callback
        self.deadline: Optional[int] = None
        self._token = 0

    def mod(self, deadline_ns: int) -> None:
        self.clock._arm(self, deadline_ns)

    def mod_ms(self, deadline_ms: int) -> None:
        self.mod(deadline_ms * 1_000_000)

    def delete(self) -> None:
        self.deadline = None
        self._token += 1

    @property
    def pending(self) -> bool:
        return self.deadline is not None


class VirtualClock:
    """Nanoseconds since machine start; advanced only explicitly."""

    def __init__(self) -> None:
        self.now_ns = 0
        self._heap: list[tuple[int, int, int, Timer]] = []
        self._seq = itertools.count()

    def now_ms(self) -> int:
        return self.now_ns // 1_000_000

    def new_timer(self, callback: Callable[[], None]) -> Timer:
        return Timer(self, callback)

    def _arm(self, timer: Timer, deadline: int) -> None:
        timer._token += 1
        timer.deadline = deadline
        heapq.heappush(self._heap, (deadline, next(self._seq), timer._token, timer))

    def _live(self) -> None:
        while self._heap and (self._heap[0][3].deadline is None or self._heap[0][2] != self._heap[0][3]._token):
            heapq.heappop(self._heap)

    def next_deadline(self) -> Optional[int]:
        self._live()
        return self._heap[0][0] if self._heap else None

    def step(self, ns: Optional[int] = None) -> int:
        """Advance by ``ns``, or to the next deadline when ``ns`` is None; fire due timers."""
        if ns is None:
            target = self.next_deadline()
            if target is None:
                return self.now_ns
        else:
            target = self.now_ns + ns
        return self.set(target)

    def set(self, target_ns: int) -> int:
        """Advance to ``target_ns`` (never backwards), firing timers in deadline order."""
        while True:
            self._live()
            if not self._heap or self._heap[0][0] > target_ns:
                break
            deadline, _, _, timer = heapq.heappop(self._heap)
            self.now_ns = max(self.now_ns, deadline)
            timer.deadline = None
            timer.callback()
        self.now_ns = max(self.now_ns, target_ns)
        return self.now_ns

    def reset_timers(self) -> None:
        for *_, t in self._heap:
            t.deadline = None
        self._heap.clear()
