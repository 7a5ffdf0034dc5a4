"""SIGTERM as a flag the training loop checks between steps (a scheduler's preemption notice).

:class:`Preemption` installs its handler when it is created, so create it first (``python -m
sdjax.main`` does so before it imports JAX): a SIGTERM that arrives while the data loads, the
steps compile or a checkpoint is restored is then remembered, and the loop stops at its first
chance with nothing lost. Imports neither JAX nor anything else heavy.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

__all__ = ["Preemption"]


class Preemption:
    """Turns SIGTERM into :attr:`requested`; restores the previous handler on :meth:`restore`.

    Args:
      install: install the handler (only possible in the main thread). Multi-host runs pass
        False: :meth:`reached` then asks JAX's preemption sync point, so that all hosts stop at
        the same step.
    """

    def __init__(self, install: bool = True) -> None:
        self.requested = False
        self._previous = None
        if install and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        logging.getLogger(__name__).warning("SIGTERM received: stopping at the next step.")
        self.requested = True

    def reached(self, step: int) -> bool:
        """Whether the run should save and stop after ``step``."""
        jax = sys.modules.get("jax")
        if jax is not None and jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # no preemption service in this jax.distributed setup
                return False
        return self.requested

    def restore(self) -> None:
        """Puts back the SIGTERM handler that was installed before this one."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
