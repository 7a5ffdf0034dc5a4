"""Checkpoints of the train state in ``workdir/checkpoints`` (orbax-checkpoint).

Each checkpoint holds two items: ``state`` (the whole :class:`sdjax.steps.TrainState`: step,
params, batch_stats, optimizer state, EMA params) and ``meta`` (JSON: the model config, the
parameter shapes, the run's whole config, and loop bookkeeping such as the best validation
accuracy and the last train loss). Orbax writes each
step into a temporary directory and renames it when complete, so a run killed during a save
leaves the previous checkpoint loadable. Before restoring, the stored model config and parameter
shapes are compared with the current ones (:meth:`Checkpointer.check` reads only this metadata,
so a trainer can do it before compiling anything): a checkpoint of another model is a clear
error and nothing is loaded.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "param_shapes"]


def param_shapes(params: Any) -> dict[str, list[int]]:
    """``{"path/to/param": shape}`` for every leaf of ``params`` (arrays or ShapeDtypeStructs)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): list(leaf.shape) for path, leaf in flat}


class Checkpointer:
    """Saves and restores train states with an orbax ``CheckpointManager``.

    Args:
      directory: where checkpoints live (``workdir/checkpoints``); created if missing.
      keep: how many of the latest checkpoints to keep.
      model_config: the run's ``config.model`` as a dict; stored and compared on restore.
    """

    def __init__(
        self,
        directory: str,
        keep: int,
        model_config: dict[str, Any] | None = None,
        *,
        create: bool = True,
    ):
        self.directory = os.path.abspath(directory)
        self.model_config = model_config or {}
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves ``state`` at ``step`` (asynchronously; call :meth:`wait` to block)."""
        meta = dict(meta, model=self.model_config, param_shapes=param_shapes(state.params))
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def check(self, target: Any, step: int | None = None) -> dict[str, Any]:
        """Reads the metadata of checkpoint ``step`` (default: latest) and compares it with ``target``.

        Reads only the JSON metadata: nothing is restored or compiled.

        Args:
          target: a train state (arrays or ``jax.ShapeDtypeStruct``) of the current run.
          step: which checkpoint; None = the latest.

        Returns:
          The checkpoint's ``meta`` dict.

        Raises:
          ValueError: the checkpoint is of another model (name or parameter shapes) or its
            metadata cannot be read (corrupted).
        """
        step = self.latest_step() if step is None else step
        where = os.path.join(self.directory, str(step))
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
        except Exception as e:
            raise ValueError(
                f"checkpoint {where} cannot be read ({type(e).__name__}: {e}); it may be "
                "corrupted. Delete it (earlier checkpoints are used then) or use a new --workdir."
            ) from None
        stored_model = meta.get("model") or {}
        if stored_model.get("name") != self.model_config.get("name"):
            raise ValueError(
                f"checkpoint {where} was written for model {stored_model.get('name')!r}, this "
                f"run uses model {self.model_config.get('name')!r}; nothing was loaded. Use a "
                "new --workdir, or the config that wrote it."
            )
        if meta.get("param_shapes") != param_shapes(target.params):
            raise ValueError(
                f"checkpoint {where} has different parameter shapes than this run's "
                f"{self.model_config.get('name')!r} (model config in the checkpoint: "
                f"{stored_model}); nothing was loaded. Use a new --workdir."
            )
        return meta

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores the checkpoint at ``step`` (default: latest) into the structure of ``target``.

        Args:
          target: a train state (arrays, or ``jax.ShapeDtypeStruct`` with shardings) of the
            current run.
          step: which checkpoint; None = the latest.

        Returns:
          ``(state, meta)``.

        Raises:
          ValueError: see :meth:`check`; or the arrays cannot be read (corrupted); nothing is
            loaded.
        """
        step = self.latest_step() if step is None else step
        meta = self.check(target, step)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )
        except Exception as e:
            raise ValueError(
                f"checkpoint {os.path.join(self.directory, str(step))} cannot be restored into "
                f"this run's train state ({type(e).__name__}: {e}); it may be corrupted or from "
                "another version."
            ) from None
        return restored["state"], meta

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
