"""Output files of long runs (measurement dumps, deployment run files) and the simulated chip's
state kept beside them: checked before any cell is touched, never overwritten silently."""

from __future__ import annotations

import os
from pathlib import Path


def check_output(out: Path, resume: bool, overwrite: bool, error: type[Exception]) -> None:
    """Refuse an output path that cannot be written, or whose existing data would be lost."""
    if out.exists() and out.is_dir():
        raise error(f"--out {out}: is a directory, expected an .h5 file path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise error(f"--out {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise error(f"--out {out}: directory {parent} is not writable")
    if out.exists() and not (resume or overwrite):
        raise error(f"--out {out} already exists: pass --resume to continue it or --overwrite to replace it")
    if resume and not out.exists():
        raise error(f"--resume: {out} does not exist; nothing to resume")


def sim_state_path(out: Path, device: str, resume: bool) -> Path | None:
    """Where the in-process simulated chip keeps its non-volatile state for this run (``sim`` only).

    A fresh run starts with a fresh chip: a snapshot or journal left by an earlier run is removed."""
    if device != "sim":
        return None
    state = out.with_name(out.name + ".simchip.npz")
    if not resume:
        for p in (state, Path(str(state) + ".journal")):
            if p.exists():
                p.unlink()
    return state
