"""Command-line entry point: ``python -m sdjax.main --config=CONFIG --workdir=DIR``.

Examples::

  python -m sdjax.main --config=configs/digits_sd.py --workdir=/tmp/sdjax_digits
  python -m sdjax.main --config=configs/cifar10_sd.py:final_drop_rate=0.3,mode=batch \\
      --config.train.num_train_steps=100 --workdir=/tmp/c10

Rerunning the same command resumes from the latest checkpoint in ``--workdir``. The entry point
installs the SIGTERM handler (first), sets the process up (:func:`sdjax.runtime.setup`) and runs
:func:`sdjax.loop.train_and_evaluate`. Every error a user can cause is one line ``error: ...``
on stderr, before anything is written: exit code 2 for the command line and the config file
(missing file, syntax error, unknown field, a value of the wrong type), 1 for a config the
trainer rejects (bad value, missing dataset, incompatible checkpoint) or a NaN loss. SIGTERM
at any time exits 0 after saving what there is to save.
"""

from __future__ import annotations

import difflib
import logging as pylogging
import os
import sys

# TensorFlow (tfds reads records through it) prints a notice about its oneDNN kernels from C++
# when it is imported; it computes nothing of the model, so the entry point turns them off
# unless the user set the variables.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging
from ml_collections import config_flags

from sdjax.preemption import Preemption

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


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain (absl and ml_collections wrap the real one)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = error.__cause__
        if inner is None and not error.__suppress_context__:
            inner = error.__context__
        if inner is None:
            break
        error = inner
    return error


def _hint(overrides: list[str]) -> str:
    """``; did you mean ...`` with the config fields closest to the given override paths."""
    from sdjax import config as config_lib  # noqa: PLC0415

    def paths(node, prefix=""):
        for key, value in node.items():
            yield from (
                paths(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
            )

    known = list(paths(config_lib.default_config().to_dict()))
    close = [m for o in overrides for m in difflib.get_close_matches(o[len("--config.") :], known)]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def describe(error: BaseException, argv: list[str]) -> str:
    """One line naming what is wrong with the command line or the config file."""
    if isinstance(error, flags.Error) and "\n" not in str(error):
        return str(error)  # e.g. "flag --config.train.batch_size=many: invalid literal ..."
    cause = _root_cause(error)
    if isinstance(cause, SyntaxError):
        return f"config file {cause.filename}:{cause.lineno}: {cause.msg}"
    if isinstance(cause, (AttributeError, KeyError)):
        detail = cause
        while isinstance(detail, BaseException) and detail.args:
            detail = detail.args[0]  # AttributeError(KeyError(message)) -> message
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        return (
            f"unknown config field {detail} (overrides given: {', '.join(overrides)}){_hint(overrides)}; "
            "only fields of the config can be overridden (see sdjax.config.default_config)"
        )
    lines = [x.strip() for x in str(cause).splitlines() if x.strip()]
    if isinstance(cause, OSError) and lines and lines[0].startswith("Failed loading config"):
        return f"cannot load the config file: {lines[-1]}"  # "[Errno 2] No such file ..."
    return " ".join(lines)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; any error in the command line or the config file is one line
    ``error: ...`` and exit code 2 (no traceback)."""
    try:
        argv = FLAGS(argv)
        FLAGS.config.get("train")  # a config file that failed to load raises only when read
        return argv
    except Exception as e:  # noqa: BLE001 (every failure to read the config is the user's)
        print(f"error: {' '.join(describe(e, argv).split())}", file=sys.stderr)
        if "--debug_config" in argv:
            raise
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    preemption = Preemption(install=not config.train.distributed)  # first: SIGTERM at any time
    logging.get_absl_handler().addFilter(_quiet_orbax)
    if not FLAGS["verbosity"].present:  # progress has its own lines; INFO is library chatter
        logging.set_verbosity(logging.WARNING)
    from sdjax import config as config_lib  # noqa: PLC0415
    from sdjax import loop, runtime  # noqa: PLC0415 (flags are parsed first: fast --help)

    try:
        config_lib.validate_fields(config)  # before the process set-up reads them
        runtime.setup(config)
        result = loop.train_and_evaluate(
            config, FLAGS.workdir, command=" ".join(sys.argv), preemption=preemption
        )
    except (ValueError, FloatingPointError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
    if result.get("preempted"):
        saved = "checkpoint saved" if result.get("saved") else "nothing new to save"
        print(f"Preempted at step {result['steps']}; {saved}. Rerun to resume.")
    else:
        print(
            f"test_accuracy={result['test_accuracy']:.4f} test_error={result['test_error']:.4f} "
            f"steps={result['steps']} train_time_s={result['train_time_s']:.1f} "
            f"results={FLAGS.workdir}/results.json"
        )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
