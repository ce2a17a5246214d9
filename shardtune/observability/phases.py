"""Wall time by phase: where a run's seconds went, from the process' launch to its summary.

One :class:`PhaseTimer` per run. ``main`` and the training loop wrap their parts in ``with phases.time(name):``
blocks. A block opened inside another pauses the outer one: every second is charged to exactly one phase (the
innermost open), so nested phases (a checkpoint saved after a training step) are never counted twice, and the
seconds outside every block are ``other``. The top-level phases, as the summary reports them:

* ``startup``: launch to the first training step's start (:meth:`PhaseTimer.end_startup`); its parts are the
  phases timed before then (``data``: reading and tokenising, ``model``: loading, wrapping, the optimizer) and the
  rest (imports, the process group, checks);
* ``first_step``: the first optimizer step, alone, because it pays the one-off costs (torch.compile, allocator
  warm-up); ``training``: the other steps; ``evaluation``; ``checkpoints`` (the blocking part of the saves);
  ``export``; ``other``. They sum to ``total``.

Compile time is measured, not guessed from step times: torch.compile reports when it starts and ends compiling
(``torch._dynamo.on_compile_start`` / ``on_compile_end``, for the forward and for the backward that AOTAutograd
compiles lazily), and those seconds are also charged, as ``compile``, to the phase they happened in: the first
step's, a recompilation in a later step, evaluation's graph (no_grad is another graph). ``compiles`` counts them.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from typing import Callable, Dict, Iterator, List, Optional

from shardtune.observability.metrics import seconds_since_launch

STARTUP_PARTS = ("data", "model")
AFTER_STARTUP = ("first_step", "training", "evaluation", "checkpoints", "export")


class PhaseTimer:
    """Exclusive wall time per named phase, startup's parts, and compile time and count per phase."""

    def __init__(self, origin: Optional[float] = None, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        # clock() at the process' launch (the default), so that startup includes interpreter start and imports
        self.origin = clock() - seconds_since_launch() if origin is None else origin
        self.seconds: Dict[str, float] = defaultdict(float)  # exclusive, since startup ended (or the origin)
        self.startup_s: Optional[float] = None
        self.startup_parts: Dict[str, float] = {}
        self.compile_s: Dict[str, float] = defaultdict(float)  # by the phase that was open when compiling began
        self.compiles: Dict[str, int] = defaultdict(int)
        self._open: List[list] = []  # [name, since] innermost last
        self._compile_started: Optional[tuple] = None  # (phase, clock()) of the compile under way
        self._lock = threading.Lock()  # compile callbacks may come from another thread

    @contextlib.contextmanager
    def time(self, name: str) -> Iterator[None]:
        """Charge the block's wall time to ``name`` (minus the phases opened inside it)."""
        self._enter(name)
        try:
            yield
        finally:
            self._exit()

    def timed(self, name: str, fn):
        """``fn`` with every call timed as ``name``."""
        def wrapper(*args, **kwargs):
            with self.time(name):
                return fn(*args, **kwargs)
        return wrapper

    def current(self) -> str:
        return self._open[-1][0] if self._open else ("other" if self.startup_s is not None else "startup")

    def _enter(self, name: str) -> None:
        with self._lock:
            now = self.clock()
            if self._open:
                outer = self._open[-1]
                self.seconds[outer[0]] += now - outer[1]
            self._open.append([name, now])

    def _exit(self) -> None:
        with self._lock:
            now = self.clock()
            name, since = self._open.pop()
            self.seconds[name] += now - since
            if self._open:
                self._open[-1][1] = now  # the outer phase resumes now

    def end_startup(self) -> None:
        """The first training step starts: what was timed so far becomes startup's parts (once)."""
        if self.startup_s is not None:
            return
        with self._lock:
            self.startup_s = self.clock() - self.origin
            self.startup_parts = {k: v for k, v in self.seconds.items() if v}
            self.seconds.clear()
            for entry in self._open:  # a phase open across the boundary counts from here on
                entry[1] = self.clock()

    # ---- compile time (torch.compile's callbacks) ---------------------------------------------
    def _compile_start(self, *_) -> None:
        with self._lock:
            self._compile_started = (self.current(), self.clock())

    def _compile_end(self, *_) -> None:
        with self._lock:
            if self._compile_started is None:
                return
            phase, since = self._compile_started
            self._compile_started = None
            self.compile_s[phase] += self.clock() - since
            self.compiles[phase] += 1

    @contextlib.contextmanager
    def watching_compiles(self) -> Iterator["PhaseTimer"]:
        """Measure torch.compile's compilations while the block runs (the callbacks are process-wide: removed
        after it, so that a later run in the same process does not report into this one)."""
        import torch._dynamo

        torch._dynamo.on_compile_start(self._compile_start)
        torch._dynamo.on_compile_end(self._compile_end)
        try:
            yield self
        finally:
            torch._dynamo.callback_handler.remove_start_callback(self._compile_start)
            torch._dynamo.callback_handler.remove_end_callback(self._compile_end)

    def compiled_in(self, phase: str) -> float:
        return self.compile_s.get(phase, 0.0)

    # ---- the report ---------------------------------------------------------------------------
    def summary(self) -> dict:
        """Seconds by phase (``phases_s`` in summary.json): the top-level phases sum to ``total``; ``startup_parts``
        and ``compile`` (by phase, included in those phases) say what the big ones were made of."""
        total = self.clock() - self.origin
        startup = self.startup_s if self.startup_s is not None else total - sum(self.seconds.values())
        seconds = dict(self.seconds) if self.startup_s is not None else {}
        parts = self.startup_parts if self.startup_s is not None else {k: v for k, v in self.seconds.items() if v}
        out = {"total": total, "startup": startup}
        out.update({name: seconds.get(name, 0.0) for name in AFTER_STARTUP})
        out.update({name: v for name, v in seconds.items() if name not in out})  # phases named elsewhere
        out["other"] = max(0.0, total - sum(v for k, v in out.items() if k != "total"))
        out["startup_parts"] = {name: parts.get(name, 0.0) for name in STARTUP_PARTS}
        out["compile"] = {name: v for name, v in self.compile_s.items() if v}
        out["compiles"] = dict(self.compiles)
        return _rounded(out)

    def format_line(self, summary: Optional[dict] = None) -> str:
        """``--> wall time 226 s: startup 124 s (data 22 s, model 30 s), first step 61 s (compile 58 s), ...``"""
        s = summary or self.summary()
        compile_s = s["compile"]

        def part(name: str) -> str:
            text = f"{name.replace('_', ' ')} {_secs(s[name])}"
            return text + (f" (compile {_secs(compile_s[name])})" if compile_s.get(name, 0) >= 0.05 else "")

        startup = f"startup {_secs(s['startup'])} (" + ", ".join(
            f"{k} {_secs(v)}" for k, v in s["startup_parts"].items()) + ")"
        rest = [part(k) for k, v in s.items() if isinstance(v, float) and k not in ("total", "startup")
                and (v >= 0.05 or k in ("first_step", "training"))]
        return f"--> wall time {_secs(s['total'])}: " + ", ".join([startup, *rest])


def _secs(x: float) -> str:
    return f"{x:.0f} s" if x >= 10 else f"{x:.1f} s"


def _rounded(value):
    if isinstance(value, float):
        return round(value, 2)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value
