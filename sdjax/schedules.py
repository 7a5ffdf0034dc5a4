"""Per-block drop-rate schedules for stochastic depth (pure Python, no JAX computation).

A schedule maps the number of residual blocks ``L`` (counted over the whole network, in forward
order) and a rate to a tuple of ``L`` per-block drop probabilities:

* :func:`linear_decay` -- Huang et al. 2016, "Deep Networks with Stochastic Depth" (and the
  original Torch code, ``yueatsprograms/Stochastic_Depth``): block ``l = 1..L`` gets
  ``final_rate * l / L``; the last block is dropped with probability ``final_rate``.
* :func:`uniform` -- every block gets the same ``rate`` (the paper's "uniform" ablation).
* :func:`efficientnet` -- the reference EfficientNet code (``tensorflow/tpu``
  ``models/official/efficientnet/efficientnet_model.py``, also used by timm's
  ``drop_path_rate``-style block scaling): block ``b = 0..L-1`` gets ``rate * b / L``, so the first
  block is never dropped and the last gets slightly less than ``rate``.

Configs name a schedule by string; :func:`get` and :data:`SCHEDULES` resolve ``"linear"`` and
``"uniform"`` (and ``"efficientnet"``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

from sdjax.checks import check_rate

__all__ = ["SCHEDULES", "efficientnet", "get", "linear_decay", "uniform"]

Schedule = Callable[[int, float], tuple[float, ...]]


def _check_num_blocks(num_blocks: int) -> int:
    if (
        isinstance(num_blocks, bool)
        or not isinstance(num_blocks, numbers.Integral)
        or num_blocks < 0
    ):
        raise ValueError(f"num_blocks must be an integer >= 0, got {num_blocks!r}.")
    return int(num_blocks)


def linear_decay(num_blocks: int, final_rate: float) -> tuple[float, ...]:
    """The paper's linear decay rule: block ``l = 1..L`` gets ``final_rate * l / L``.

    Args:
      num_blocks: the number of residual blocks ``L`` (>= 0).
      final_rate: the drop probability of the last block, in ``[0, 1]``.

    Returns:
      ``L`` drop probabilities, increasing from ``final_rate / L`` to ``final_rate``.
    """
    num_blocks = _check_num_blocks(num_blocks)
    final_rate = check_rate(final_rate, "final_rate")
    return tuple(final_rate * layer / num_blocks for layer in range(1, num_blocks + 1))


def uniform(num_blocks: int, rate: float) -> tuple[float, ...]:
    """Every block gets the same drop probability ``rate``.

    Args:
      num_blocks: the number of residual blocks (>= 0).
      rate: the drop probability, in ``[0, 1]``.

    Returns:
      ``num_blocks`` copies of ``rate``.
    """
    num_blocks = _check_num_blocks(num_blocks)
    rate = check_rate(rate, "rate")
    return (rate,) * num_blocks


def efficientnet(num_blocks: int, rate: float) -> tuple[float, ...]:
    """The reference EfficientNet rule: block ``b = 0..L-1`` gets ``rate * b / L``.

    Args:
      num_blocks: the number of blocks ``L`` (>= 0).
      rate: the ``drop_connect_rate`` of the model, in ``[0, 1]``.

    Returns:
      ``L`` drop probabilities, from 0 (first block) to ``rate * (L - 1) / L`` (last block).
    """
    num_blocks = _check_num_blocks(num_blocks)
    rate = check_rate(rate, "rate")
    return tuple(rate * block / num_blocks for block in range(num_blocks))


SCHEDULES: dict[str, Schedule] = {
    "linear": linear_decay,
    "uniform": uniform,
    "efficientnet": efficientnet,
}


def get(name: str) -> Schedule:
    """Returns the schedule function registered under ``name``.

    Args:
      name: ``"linear"``, ``"uniform"`` or ``"efficientnet"``.

    Raises:
      ValueError: for an unknown name; the message lists the valid names.
    """
    try:
        return SCHEDULES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown drop schedule {name!r}; valid names: {sorted(SCHEDULES)}."
        ) from None
