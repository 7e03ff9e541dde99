"""Keeping the event loop responsive: an adaptive cap on the jobs one process runs at once.

Every job's steps, and every record read and written, share one event loop. Once that
loop uses all of its core, more jobs at once add no throughput: they only lengthen each
turn of the loop, and every job waits a turn at each of its steps, a quiet tenant's
included (at a fixed throughput, the time a job spends grows with the number of jobs in
the process). So the replica caps its running jobs below `max_inflight` while its loop
is saturated, and lifts the cap as it recovers (additive increase, multiplicative
decrease, as TCP and adaptive concurrency limiters do):

- every `interval_s` it measures how late a timer fires (the loop's lag) and how much
  of that time the loop's thread was running or ready to run (its busy fraction), both
  smoothed;
- the loop is *saturated* when the lag is above `lag_target_s` and the thread was busy
  for at least `busy_threshold` of the time. Lag with a thread that was neither
  running nor waiting for a CPU (a process stopped, a blocking call) is not the jobs'
  doing, so the cap does not move;
- saturated, with more than `min_slots` jobs running: the cap falls to `cut` times what
  runs (never below `min_slots`), at most once per `cooldown_s`, so a cut shows its
  effect before the next;
- not saturated with every slot under the cap in use: the cap rises by one slot.

Short jobs slip past a cap on slots: at `min_slots` jobs of a few milliseconds a process
still starts as many jobs a second as its core can take, and stays saturated. So while
the loop is saturated with no more than `min_slots` jobs running, the guard paces the
starts: a start rate of `cut` times the rate it measured (smoothed), cut again at most
once per `cooldown_s` while saturated, raised by `rate_step` of itself at each sample
that is not, and lifted once it stands at twice the starts it lets through. Pacing
only helps someone when another tenant is there to be kept waiting, so it holds only
while the process is *contended* (more than one tenant started jobs lately): a single
tenant's backlog runs as fast as the core allows.

Under either cap the fair scheduler still starts the first job of a tenant with nothing
running (`FairScheduler.pop`), so a quiet tenant is never held back by it; the backlogs
are what it holds back. Pure but for `LoopSampler`, which reads the clock.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass

__all__ = ["LoopSample", "LoopSampler", "SlotGuard"]

# Weight of a new sample in the smoothed lag and busy fraction.
_SMOOTHING = 0.3


@dataclass(frozen=True, slots=True)
class LoopSample:
    """One measurement: how late the sampler's timer fired, and the share of the time
    since the last sample the loop's thread spent on a CPU (0 to 1)."""

    lag_s: float
    busy: float


class LoopSampler:
    """Measures the loop between two calls of `sample` (create it and call it from the
    loop's thread, after sleeping `interval_s`).

    Busy counts the thread's time on a CPU and, where Linux reports it
    (`/proc/thread-self/schedstat`), its time waiting for one: a loop that would run but
    shares its core with other processes is saturated too, and fewer jobs shorten its
    turns as much. Elsewhere only the time on a CPU counts.
    """

    def __init__(self) -> None:
        self._schedstat: int | None = None
        with contextlib.suppress(OSError):
            self._schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        self._wall = time.monotonic()
        self._cpu = time.thread_time()
        self._sched = self._read_schedstat()

    def _read_schedstat(self) -> tuple[float, float] | None:
        """Seconds on a CPU and waiting for one, or None where Linux does not say."""
        if self._schedstat is None:
            return None
        try:
            on_cpu, waiting = os.pread(self._schedstat, 128, 0).split()[:2]
            return int(on_cpu) / 1e9, int(waiting) / 1e9
        except (OSError, ValueError):
            self.close()
            return None

    def sample(self, interval_s: float) -> LoopSample:
        """The lag of a sleep of `interval_s` that just ended, and the busy fraction."""
        wall, cpu, sched = time.monotonic(), time.thread_time(), self._read_schedstat()
        elapsed = wall - self._wall
        busy_s = cpu - self._cpu
        if sched is not None and self._sched is not None:
            if sched[0] == self._sched[0] and busy_s > 0.005:
                self.close()  # a kernel that keeps no scheduler statistics: CPU time alone
                sched = None
            else:
                busy_s = (sched[0] - self._sched[0]) + (sched[1] - self._sched[1])
        fraction = busy_s / elapsed if elapsed > 0 else 0.0
        self._wall, self._cpu, self._sched = wall, cpu, sched
        return LoopSample(lag_s=max(0.0, elapsed - interval_s), busy=min(1.0, max(0.0, fraction)))

    def close(self) -> None:
        """Release the file it reads."""
        if self._schedstat is not None:
            os.close(self._schedstat)
            self._schedstat = None


class SlotGuard:
    """The cap on running jobs, from loop samples (see the module's text)."""

    def __init__(
        self,
        max_slots: int,
        *,
        min_slots: int,
        lag_target_s: float,
        busy_threshold: float,
        cut: float = 0.8,
        cooldown_s: float = 0.25,
        rate_step: float = 0.02,
    ) -> None:
        self.max_slots = max_slots
        self.min_slots = min(min_slots, max_slots)
        self.limit = max_slots
        self.lag_s = 0.0
        self.busy = 0.0
        self.saturated = False
        self._lag_target_s = lag_target_s
        self._busy_threshold = busy_threshold
        self._cut = cut
        self._cooldown_s = cooldown_s
        self._next_cut = -math.inf
        self._rate_step = rate_step
        # Starts a second allowed (None: not paced), and the measured rate, smoothed.
        self.rate: float | None = None
        self.start_rate = 0.0
        self._last: float | None = None

    def observe(
        self,
        sample: LoopSample,
        running: int,
        now: float,
        started: int = 0,
        *,
        contended: bool = True,
    ) -> int:
        """Take one sample with the number of jobs running now and started since the
        last sample, and whether more than one tenant started jobs lately; the new cap
        on slots (`rate`: the cap on starts a second)."""
        self.lag_s += _SMOOTHING * (sample.lag_s - self.lag_s)
        self.busy += _SMOOTHING * (sample.busy - self.busy)
        if self._last is not None and now > self._last:
            measured = started / (now - self._last)
            self.start_rate += _SMOOTHING * (measured - self.start_rate)
        self._last = now
        self.saturated = self.lag_s > self._lag_target_s and self.busy >= self._busy_threshold
        if self.rate is not None and not contended:
            self.rate = None  # nobody left to keep waiting
        if self.saturated:
            if now >= self._next_cut:
                if running > self.min_slots:
                    # Cut from what runs (the cap may stand far above it, unused).
                    self.limit = max(self.min_slots, int(min(self.limit, running) * self._cut))
                    self._next_cut = now + self._cooldown_s
                elif contended and self.start_rate > 0:
                    # Too few jobs running to cut, still saturated: pace the starts.
                    base = self.start_rate if self.rate is None else self.rate
                    self.rate = max(1.0, min(base, self.start_rate) * self._cut)
                    self._next_cut = now + self._cooldown_s
        elif self.rate is not None:
            self.rate *= 1.0 + self._rate_step
            if self.rate >= 2 * max(1.0, self.start_rate):
                self.rate = None  # it no longer holds anything back
        elif running >= self.limit:
            self.limit = min(self.max_slots, self.limit + 1)
        return self.limit
