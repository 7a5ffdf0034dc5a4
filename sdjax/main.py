"""Command-line entry point: ``python -m sdjax.main --config=CONFIG --workdir=DIR``.

Examples::

  python -m sdjax.main --config=configs/digits_sd.py --workdir=/tmp/sdjax_digits
  python -m sdjax.main --config=configs/cifar10_sd.py:final_drop_rate=0.3,mode=batch \\
      --config.train.num_train_steps=100 --workdir=/tmp/c10

Rerunning the same command resumes from the latest checkpoint in ``--workdir``. All the work is
done by :func:`sdjax.train.train_and_evaluate`; errors in the config (bad values, unknown
fields) are reported before anything is compiled, and the exit code is 1 for them.
"""

from __future__ import annotations

import logging as pylogging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "Training config file, optionally with an argument: FILE.py:key=value,...",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.json.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax(record: pylogging.LogRecord) -> bool:
    """Drops orbax-checkpoint's per-save INFO chatter (warnings and errors still show)."""
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a clear error for an override of a field the config lacks.

    ml_collections raises ``KeyError``/``AttributeError`` (not a flags error) for
    ``--config.model.final_drop_rat=0.3``; absl would print a bare traceback for it.
    """
    try:
        return app.parse_flags_with_usage(argv)  # absl's default: flag errors -> FATAL, exit 1
    except (AttributeError, KeyError) as e:
        detail = e
        while isinstance(detail, BaseException) and detail.args:
            detail = detail.args[0]  # AttributeError(KeyError(message)) -> message
        detail = str(detail).replace("\n", "; ")
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        print(
            f"FATAL Flags parsing error: unknown config field {detail} (overrides given: "
            f"{', '.join(overrides)}). Only fields of the config can be overridden; see "
            "sdjax.config_utils.default_config for all of them.",
            file=sys.stderr,
        )
        sys.exit(1)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_quiet_orbax)
    from sdjax import train  # noqa: PLC0415 (flags are parsed first: fast --help)

    try:
        result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, FloatingPointError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if result.get("preempted"):
        print(f"Preempted at step {result['steps']}; checkpoint saved. Rerun to resume.")
    else:
        print(
            f"test_accuracy={result['test_accuracy']:.4f} test_error={result['test_error']:.4f} "
            f"steps={result['steps']} train_time_s={result['train_time_s']:.1f} "
            f"results={FLAGS.workdir}/results.json"
        )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
