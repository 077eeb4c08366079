"""Graceful stops: SIGTERM/SIGINT finish the current step, save, and exit 0.

One process: Python signal handlers set a flag the loop reads after each step. Several
processes: every host must save the *same* step, so the loop asks JAX's preemption sync point
(`CheckpointManager.reached_preemption`), which agrees on a step across hosts once any host was
told to stop (JAX's distributed runtime catches SIGTERM itself there).
"""

from __future__ import annotations

import signal
import threading

import jax


class PreemptionGuard:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        self._multi_host = jax.process_count() > 1
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread
        signals = (signal.SIGINT,) if self._multi_host else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self.signal_name = signal.Signals(signum).name

    def should_stop(self, step: int, manager) -> bool:
        if self._multi_host and manager.reached_preemption(step):
            self.signal_name = self.signal_name or "SIGTERM (preemption notice)"
            return True
        return self.signal_name is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
