"""Executes notebooks/tour.ipynb top to bottom (nbclient, kernel python3) and checks its outputs.

The notebook trains a small ResNet on digits, so this is the slowest test of the suite (about two
minutes on two CPU cores); the committed notebook has its outputs stripped.
"""

import os

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOK_TIMEOUT_S = 600  # per cell; the whole notebook takes ~2 minutes on two CPU cores


@pytest.fixture(scope="module")
def notebook_path(repo_root):
    return repo_root / "notebooks" / "tour.ipynb"


def test_committed_notebook_has_no_outputs(notebook_path):
    nb = nbformat.read(notebook_path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"outputs not stripped in cell {cell.get('id')}"
            assert cell.execution_count is None


@pytest.fixture(scope="module")
def executed(notebook_path, repo_root, tmp_path_factory):
    nb = nbformat.read(notebook_path, as_version=4)
    # The kernel inherits this environment: sdjax importable without installation, quiet TF and
    # temporary files in a fresh folder. (MPLBACKEND stays unset: the kernel's inline backend is
    # what turns the figures into image outputs.)
    env_updates = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")])),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "TMPDIR": str(tmp_path_factory.mktemp("tour_tmp")),
    }
    saved = {k: os.environ.get(k) for k in [*env_updates, "MPLBACKEND"]}
    os.environ.pop("MPLBACKEND", None)
    os.environ.update(env_updates)
    try:
        client = NotebookClient(
            nb,
            timeout=NOTEBOOK_TIMEOUT_S,
            kernel_name="python3",
            resources={"metadata": {"path": str(repo_root / "notebooks")}},
        )
        client.execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def _text(cell) -> str:
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif "data" in out and "text/plain" in out.data:
            parts.append(out.data["text/plain"])
    return "".join(parts)


def _images(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.outputs)


def test_notebook_runs_without_errors(executed):
    code_cells = [c for c in executed.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code_cells)
    for cell in code_cells:
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"cell {cell.get('id')} raised {errors[0].ename}: {errors[0].evalue}"


def test_notebook_key_outputs(executed):
    text = "\n".join(_text(c) for c in executed.cells if c.cell_type == "code")
    num_images = sum(_images(c) for c in executed.cells if c.cell_type == "code")
    # Mask pictures, row vs batch, schedule, training curves.
    assert num_images >= 4, num_images
    assert "same key -> same output: True" in text
    assert "other key -> other output: True" in text
    assert "eval mode is deterministic: True" in text
    # The missing-key error names how to pass a key.
    assert "rngs=" in text
    # The training cell reports a test accuracy well above chance (10 classes).
    line = next(s for s in text.splitlines() if "test accuracy" in s)
    accuracy = float(line.split("test accuracy")[1].split(",")[0])
    assert accuracy > 0.5, line
