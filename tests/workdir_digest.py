"""``tree_digest(path)``: the sha256 of every file under a directory, to assert a workdir is unchanged."""

import hashlib
import pathlib


def tree_digest(path) -> dict[str, str]:
    """``{relative file path: sha256 hex digest}`` of every file under ``path``."""
    path = pathlib.Path(path)
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }
