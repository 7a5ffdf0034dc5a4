"""Runs ``python -m sdjax.main`` unchanged, except at the points the tests choose.

Environment (all optional):
  SDJAX_TEST_EVENT: ``step:K`` -- when the batch of step K (0-based) is fetched (steps 0..K-1
    were dispatched); ``commit:S`` -- inside orbax's commit (rename) of checkpoint S, after all
    its data was written; ``build`` -- while the trainer loads the data (before any step).
  SDJAX_TEST_ACTION: ``kill`` (SIGKILL this process at the event, as a scheduler's kill would)
    or ``pause`` (write SDJAX_TEST_MARKER and wait while that file exists, so that the test
    can send a signal at a known point).
"""

import os
import runpy
import signal
import sys
import time

EVENT = os.environ.get("SDJAX_TEST_EVENT", "")
ACTION = os.environ.get("SDJAX_TEST_ACTION", "kill")
MARKER = os.environ.get("SDJAX_TEST_MARKER")


def reached(what: str) -> None:
    if what != EVENT:
        return
    if ACTION == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    with open(MARKER + ".tmp", "w") as f:
        f.write(what)
    os.replace(MARKER + ".tmp", MARKER)
    deadline = time.time() + 300
    while os.path.exists(MARKER):
        if time.time() > deadline:
            os._exit(3)
        time.sleep(0.02)


def install() -> None:
    if EVENT.startswith("step:"):
        from sdjax.data import pipeline

        original_batch = pipeline.InMemoryData.train_batch

        def train_batch(self, seed, step, *args, **kwargs):
            reached(f"step:{step}")
            return original_batch(self, seed, step, *args, **kwargs)

        pipeline.InMemoryData.train_batch = train_batch
    elif EVENT.startswith("commit:"):
        from orbax.checkpoint._src.path import atomicity

        original_finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self, *args, **kwargs):
            reached(f"commit:{self.get_final().name}")
            return await original_finalize(self, *args, **kwargs)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    elif EVENT == "build":
        import sdjax.data

        original_create = sdjax.data.create

        def create(*args, **kwargs):
            reached("build")
            return original_create(*args, **kwargs)

        sdjax.data.create = create


if __name__ == "__main__":
    install()
    sys.argv[0] = "sdjax.main"
    runpy.run_module("sdjax.main", run_name="__main__", alter_sys=True)
