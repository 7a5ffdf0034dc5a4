"""sdjax.host_malloc: XLA:CPU's large per-call buffers stop page-faulting once "reuse" is applied."""

import json
import platform
import subprocess
import sys
import textwrap

import pytest

from sdjax import host_malloc

# Where glibc's mallopt exists (elsewhere "reuse" is a no-op that returns False).
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# A fresh process (the allocator settings are process-wide and best applied before JAX starts):
# a jitted op whose 64 MB output is allocated and freed on every call, above glibc's default
# mmap threshold. Prints the median minor page faults per call after warm-up.
_CHILD = textwrap.dedent(
    """
    import json, resource, statistics, sys
    from sdjax import host_malloc
    applied = host_malloc.configure(sys.argv[1])
    import jax, jax.numpy as jnp
    x = jnp.ones((16 * 2**20,), jnp.float32)
    double = jax.jit(lambda a: a * 2.0)
    faults = []
    for _ in range(45):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        out = jax.block_until_ready(double(x))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert float(out[123]) == 2.0
    # The heap grows over the first calls (JAX frees the previous output asynchronously, so a
    # call may find no hole yet): the median over the last 15 calls is the steady state.
    print(json.dumps({"applied": applied, "faults_per_call": statistics.median(faults[30:])}))
    """
)


def _faults_per_call(mode: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, mode],
        capture_output=True,
        text=True,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not GLIBC,
    reason="the mallopt settings exist on Linux with glibc only (elsewhere 'reuse' is a no-op)",
)
def test_reuse_stops_the_per_call_page_faults():
    system = _faults_per_call("system")
    reuse = _faults_per_call("reuse")
    assert system["applied"] is False and reuse["applied"] is True
    pages = 64 * 2**20 / 4096
    # glibc's default maps the 64 MB output afresh on every call: one fault per 4 KB page (fewer
    # with transparent huge pages, hence the loose bound); with "reuse" the heap keeps the pages.
    assert system["faults_per_call"] > 0.25 * pages, system
    assert reuse["faults_per_call"] < 0.02 * pages, reuse


def test_system_changes_nothing_and_bad_modes_are_rejected():
    assert host_malloc.configure("system") is False
    for bad in ("fast", "", None, 1):
        with pytest.raises(ValueError) as error:
            host_malloc.configure(bad)
        message = str(error.value)
        assert repr(bad) in message and "auto, reuse, system" in message


@pytest.mark.parametrize("platforms, on_cpu", [("cuda", False), ("tpu,cpu", False), ("cpu", True)])
def test_auto_follows_the_platform(platforms, on_cpu):
    """ "auto" applies the settings only where JAX computes on the CPU (JAX_PLATFORMS first entry)."""
    code = (
        "import jax\nfrom sdjax import host_malloc\n"
        "print(host_malloc._runs_on_cpu(), host_malloc.configure('auto'))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={"JAX_PLATFORMS": platforms, "PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [str(on_cpu), str(on_cpu and GLIBC)]
