"""What a run shows and records: a progress bar or log lines, metrics.jsonl, loss.png, memory.

On a terminal the loop shows a tqdm bar (loss, tokens/s, ETA). When stdout is not a terminal
(CI, ``nohup``, a pipe) a bar would write carriage-return noise into the log, so the same
numbers are printed as plain lines about every 5% of the run.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lorafit.common.files import atomic_write, write_text


def fmt_duration(seconds: float) -> str:
    """``83.2`` -> ``1m23s``."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def fmt_bytes(n: float) -> str:
    """Bytes in B / KB / MB / GB (powers of 1024, one decimal)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory of this process so far: (bytes, kind). CUDA: max allocated; CPU: max RSS.

    On Linux the CPU peak is ``VmHWM`` of /proc/self/status: ``ru_maxrss`` carries the parent's
    resident size over ``fork`` + ``exec``, so a run started by a big process (a test runner, a
    benchmark) would report its parent's memory as its own.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "CUDA peak allocated"
    hwm = _vm_hwm()
    if hwm is not None:
        return hwm, "peak RSS"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "peak RSS"


def _vm_hwm() -> int | None:
    """This process's own peak resident size in bytes (Linux ``VmHWM``), else None."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), None)
    except (OSError, ValueError):
        return None


class Progress:
    """Training progress for rank 0 (other ranks pass ``enabled=False`` and stay silent).

    Args:
        total: optimizer steps in the run.
        start: steps already done (resume).
        enabled: False on ranks other than 0.
        log_every: plain-line cadence in steps (0 = about 20 lines per run).
        tty: force the bar on/off (default: ``sys.stdout.isatty()``).
    """

    def __init__(
        self, total: int, start: int = 0, enabled: bool = True, log_every: int = 0, tty: bool | None = None
    ):
        self.total, self.enabled = total, enabled
        self.log_every = log_every or max(1, total // 20)
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.start_step, self.t0 = start, time.perf_counter()
        self.bar = None
        if enabled and self.tty:
            self.bar = tqdm(
                total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stdout
            )

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        """Report that optimizer step ``step`` (1-based) finished."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False
            )
            return
        if step % self.log_every and step != self.total:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done else 0.0
        print(
            f"step {step}/{self.total} ({100 * step / self.total:.0f}%)  loss {loss:.4f}  lr {lr:.2e}  "
            f"{tokens_per_s:,.0f} tok/s  eta {fmt_duration(eta)}",
            flush=True,
        )

    def write(self, line: str) -> None:
        """Print a line without breaking the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsLog:
    """``metrics.jsonl``: one JSON object per optimizer step (``kind`` "train") or evaluation ("eval").

    Lines are flushed as they are written so a killed run keeps its history; on resume, lines
    past the checkpoint's step are dropped (they describe steps that will be redone).
    """

    def __init__(self, path: Path | None, resume_step: int | None = None):
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path is None:
            return
        if resume_step is not None and path.exists():
            for raw in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", 0) <= resume_step:
                    self.records.append(rec)
        write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is not None:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self.path is not None and not self._fh.closed:
            self._fh.close()


def plot_loss(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Write ``loss.png``: training loss per step, eval loss as points (atomic write)."""
    # lazy: matplotlib costs about a second; `lorafit info` and `train --help` import this module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above, after choosing the Agg backend

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval" and "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), lw=1, label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", ms=4, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
