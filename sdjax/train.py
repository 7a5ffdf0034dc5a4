"""Training and evaluation: the public names of the trainer in one place.

* :mod:`sdjax.steps`: the train state and the pure, jittable steps -- :class:`TrainState`,
  :func:`create_train_state`, :func:`train_step`, :func:`eval_step`.
* :mod:`sdjax.trainer`: :func:`build` makes and checks data, model, optimizer, state and the
  compiled steps of a run, once.
* :mod:`sdjax.loop`: :func:`train_and_evaluate`, the loop (resume, evaluation, checkpoints,
  ``results.json``).
* :mod:`sdjax.runtime`: process set-up (:func:`create_mesh`, :func:`setup`, ...), called by
  ``python -m sdjax.main``, not by the loop.
"""

from __future__ import annotations

from sdjax.loop import LoopState, train_and_evaluate
from sdjax.preemption import Preemption
from sdjax.runtime import create_mesh, maybe_initialize_distributed, request_cpu_devices, setup
from sdjax.steps import TrainState, create_train_state, cross_entropy, eval_step, train_step
from sdjax.trainer import Trainer, build, create_model, model_kwargs

__all__ = [
    "LoopState",
    "Preemption",
    "TrainState",
    "Trainer",
    "build",
    "create_mesh",
    "create_model",
    "create_train_state",
    "cross_entropy",
    "eval_step",
    "maybe_initialize_distributed",
    "model_kwargs",
    "request_cpu_devices",
    "setup",
    "train_and_evaluate",
    "train_step",
]
