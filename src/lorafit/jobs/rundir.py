"""The run directory, checked before a model is loaded: never clobber a run, never half-resume one.

``lorafit train`` writes into one directory (see :mod:`lorafit.jobs.train`). Before anything is
loaded:

* a new run's ``--out`` must be absent or empty, or an old run's directory with ``--overwrite``
  (its files are then removed at the first write, so nothing stale such as ``best/`` stays);
  it must be a directory we can create files in (probed with a temporary file);
* ``--resume`` refuses a flag that would change what the checkpoint was computed with (shapes,
  data order, schedule), lists every difference in one line, and checks that ``checkpoint.pt``
  is readable, all before writing anything;
* what a killed save left behind (``.<name>.*.tmp`` and ``<name>.old``) is cleaned, and an
  ``adapter.old`` without ``adapter/`` is renamed back (:func:`clean_leftovers`).

Under torchrun only rank 0 reads or writes the directory (:func:`is_main_process`): the other
ranks would race it (rank 0 may already be writing ``config.yaml`` while another rank checks).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from lorafit.train.checkpoint import CHECKPOINT, load_checkpoint
from lorafit.common.errors import LorafitError

# Every name a run directory can hold (detect adds data.yaml, train_subset.txt and ultralytics/).
RUN_ENTRIES = frozenset(
    {
        "config.yaml",
        "adapter",
        "model",
        "best",
        "metrics.jsonl",
        "metrics.json",
        "loss.png",
        CHECKPOINT,
        "data.yaml",
        "train_subset.txt",
        "ultralytics",
        "tensorboard",
        "wandb",
    }
)
SWAPPED = ("adapter", "model", "best")  # the directories checkpoint.replace_dir swaps in

# Options a resumed run may change: they decide what is logged, evaluated or saved, and where the
# work runs, not the computed weights. Every other option (task options included) fixes the
# adapter's shapes, the rows of each step or the learning-rate schedule, so it is refused.
RESUMABLE_CHANGES = frozenset(
    {"device", "eval_every", "eval_before", "eval_batch_size", "save_every", "log_every", "grad_checkpointing",
     "compile", "stop_at_step", "report_to"}
)
NOT_COMPARED = frozenset({"config", "resume", "out", "overwrite", "title"})


def is_main_process() -> bool:
    """Rank 0 (or no torchrun): the process that checks and writes the run directory."""
    return os.environ.get("RANK", "0") == "0"


def is_leftover(name: str) -> bool:
    """A temporary entry of an interrupted atomic write / directory swap, or a swap's old copy."""
    return (name.startswith(".") and name.endswith(".tmp")) or name in {f"{s}.old" for s in SWAPPED}


def probe_writable(directory: Path, flag: str) -> None:
    """Create ``directory`` (and missing parents) and a temporary file in it, then remove them.

    Leaves the file system as it found it; what is created is only a proof that the run's files
    can be written, before minutes are spent loading a model.

    Raises:
        LorafitError: the path (or a parent) is a file, or creating there fails (permissions,
            read-only file system).
    """
    if directory.exists() and not directory.is_dir():
        raise LorafitError(f"{flag} {directory}: exists and is not a directory")
    missing, probe = [], directory
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise LorafitError(f"{flag} {directory}: {probe} is a file, not a directory")
    made: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            made.append(d)
        fd, tmp = tempfile.mkstemp(prefix=".lorafit-probe.", suffix=".tmp", dir=directory)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        why = exc.strerror or exc.__class__.__name__
        raise LorafitError(f"{flag} {directory}: cannot write there ({why})") from None
    finally:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()


def check_new_run(out: str | Path, overwrite: bool) -> None:
    """``--out`` of a new run: writable, and empty unless ``--overwrite`` names an old run.

    Raises:
        LorafitError: not a writable directory; not empty without ``--overwrite``; with
            ``--overwrite``, holding files a lorafit run does not write (those are never deleted).
    """
    d = Path(out)
    probe_writable(d, "--out")
    entries = sorted(os.listdir(d)) if d.is_dir() else []
    if all(e.startswith(".") and e.endswith(".tmp") for e in entries):
        for e in entries:  # only the temporary files of a start killed at its first write
            _remove(d / e)
        return
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    if not overwrite:
        what = "holds a run" if (d / "config.yaml").exists() else "not empty"
        raise LorafitError(
            f"--out {d}: {what} ({shown}); add --overwrite to replace it, --resume {d} to continue it, "
            "or choose another --out"
        )
    foreign = [e for e in entries if e not in RUN_ENTRIES and not is_leftover(e)]
    if foreign:
        raise LorafitError(
            f"--out {d}: --overwrite replaces only a lorafit run's files, and {', '.join(foreign[:4])} "
            "is not one; move it or choose another --out"
        )


def clear_old_run(out: str | Path) -> None:
    """``--overwrite``: delete the old run's entries (checked by :func:`check_new_run`).

    The checkpoint goes first, so a kill part-way leaves a directory ``--resume`` refuses rather
    than one it would continue with half the files of another run.
    """
    d = Path(out)
    if not d.is_dir():
        return
    names = sorted(os.listdir(d), key=lambda n: (n != CHECKPOINT, n == "config.yaml", n))
    for name in names:
        if name in RUN_ENTRIES or is_leftover(name):
            _remove(d / name)


def clean_leftovers(run: str | Path) -> list[str]:
    """Remove what a killed save left in ``run``; rename ``<name>.old`` back when ``<name>`` is missing.

    ``checkpoint.atomic_write`` and ``replace_dir`` build under ``.<name>.*.tmp`` and rename at
    the end, so such an entry is never the only copy of anything, except in ``replace_dir``'s
    fallback (no atomic exchange), where a kill between its two renames leaves the previous
    complete copy as ``<name>.old`` and no ``<name>``. Returns the names handled.
    """
    d = Path(run)
    done = []
    for name in SWAPPED:
        old, final = d / f"{name}.old", d / name
        if old.is_dir() and not final.exists():
            os.replace(old, final)
            done.append(f"{name}.old")
    for name in sorted(os.listdir(d)) if d.is_dir() else []:
        if is_leftover(name):
            _remove(d / name)
            done.append(name)
    return done


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_resume(run: Path) -> None:
    """Before a resume loads anything: the checkpoint is readable and the directory writable.

    Then (and only then: a refused resume changes nothing) the leftovers of a kill are cleaned.
    """
    load_checkpoint(run, mmap=True)  # LorafitError naming the file when truncated / corrupt
    probe_writable(run, "--resume")
    clean_leftovers(run)


def reserve_default(task: str, root: str | Path = "runs") -> str:
    """Create and return a fresh ``runs/<task>-<timestamp>`` (``-2``, ``-3``, ... when taken).

    ``mkdir`` without ``exist_ok`` is atomic, so two jobs started in the same second (or a
    script running the default job twice) never share a directory.
    """
    base = Path(root) / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    probe_writable(base.parent, "--out")
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
            return str(path)
        except FileExistsError:
            continue
    raise LorafitError(f"--out: {base}-2 ... -999 all exist; give --out")


def _same(a: Any, b: Any, kind: str) -> bool:
    """Equal values; paths (``--train``, and ``--model`` given as a directory) compare as files."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str):
        if kind == "path" and os.path.abspath(a) == os.path.abspath(b):
            return True
        with contextlib.suppress(OSError):
            return os.path.samefile(a, b)
    return False


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def refuse_changes(run: Path, opts: dict[str, Any], recorded: dict[str, Any], table: list) -> None:
    """Refuse ``--resume`` with options that differ from the run's own.

    Args:
        run: the run directory.
        opts: the options resolved from the run's config.yaml plus the user's flags / --config.
        recorded: the same resolution without the user's layers (what the run was started with).
        table: the option table (for flag names and kinds).

    Raises:
        LorafitError: one line listing every refused difference as ``name (old -> new)``.
    """
    changed = [
        f"{o.name} ({_show(recorded.get(o.key))} -> {_show(opts.get(o.key))})"
        for o in table
        if o.key not in RESUMABLE_CHANGES
        and o.key not in NOT_COMPARED
        and not _same(recorded.get(o.key), opts.get(o.key), o.kind)
    ]
    if changed:
        raise LorafitError(
            f"--resume {run}: cannot change {', '.join(changed)} of a run (they fix the adapter's shapes, "
            "the data order or the schedule); start a new run with --out"
        )
