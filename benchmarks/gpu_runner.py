"""gpu_suite.py's timing loop: build each method, warm it up, then time all of them interleaved.

Interleaved like train_step.py: one call of each method per round, the order rotated every round
(and reversed every other cycle), so a slow phase of the machine hits every method alike and a
same-round ratio (``bench_tables.paired``) cancels it.

Peak memory with every method resident at once: a method's peak is
    resident bytes (what it holds between steps: its model copy, optimizer state; the change of
    the allocated bytes while it was built and warmed up)
  + its step peak (the largest rise of the allocator's high-water mark over one of its calls,
    the mark reset before each call),
which is what ``max_memory_allocated`` reports when the method runs alone. On CUDA the meter is
``torch.cuda.memory_allocated`` / ``max_memory_allocated``; a CPU dry run uses the process RSS
and its high-water mark (``/proc/self/status``, reset through ``/proc/self/clear_refs``) as a
stand-in, or reports null where that is not available.

A method that raises (while built, warmed up or timed) is recorded with its error and leaves the
rounds; the others go on. ``Skipped`` marks a method that cannot run here (a missing package).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench_tables import round_ms, spread


class Skipped(Exception):
    """A method that cannot run in this environment (recorded as skipped, with the reason)."""


@dataclass
class Built:
    fn: Callable[[], object]  # one step / call; may return a scalar tensor (the loss)
    info: dict = field(default_factory=dict)  # stored in the JSON entry
    cleanup: Callable[[], None] | None = None  # after the timed rounds


@dataclass
class Method:
    key: str
    label: str
    build: Callable[[], Built]


class CudaMeter:
    name = "torch.cuda.max_memory_allocated (reset before each call) + resident bytes"

    def allocated(self) -> int:
        return torch.cuda.memory_allocated()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated()


class RssMeter:
    """CPU stand-in: process RSS and its high-water mark (Linux); not comparable to a GPU peak."""

    name = "cpu stand-in: process RSS high-water mark (reset through /proc/self/clear_refs) + resident RSS"

    @staticmethod
    def create():
        try:
            m = RssMeter()
            m.reset_peak()
            m.allocated(), m.peak()
            return m
        except (OSError, ValueError, KeyError):
            return None

    @staticmethod
    def _status(field_name: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field_name)

    def allocated(self) -> int:
        return self._status("VmRSS")

    def reset_peak(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> int:
        return self._status("VmHWM")


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def free(dev: str) -> None:
    """Drops unreachable models before the next one is built (CUDA: and returns the cached blocks)."""
    if dev == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def dynamo_counts() -> tuple[int, int]:
    """(graph breaks, graphs compiled) so far in this process, from dynamo's counters."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), int(counters["stats"].get("unique_graphs", 0))


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:600]


class InjectedFailure(RuntimeError):
    """Raised by ``--fail-method`` (the test of a failing method)."""


def _failing(fn, key, warmup):
    """``fn`` that raises from its first call after the warm-up on (a failure in the timed rounds)."""
    calls = [0]

    def wrapped():
        calls[0] += 1
        if calls[0] > warmup:
            raise InjectedFailure(f"--fail-method {key}: injected failure in a timed call")
        return fn()
    return wrapped


def _fail_mode(key: str, fail: list[str]) -> str | None:
    """'build', 'run' or None for method ``key`` ('variant.phase' keys match their variant too)."""
    names = {key, key.split(".")[0]}
    for f in fail:
        name, _, when = f.partition(":")
        if name in names:
            return when or "run"
    return None


def build_all(methods: list[Method], dev: str, meter, warmup: int, fail: list[str], log=print):
    """Build and warm up each method in turn. Returns (entries, live fns, cleanups)."""
    res, live, cleanups = {}, {}, []
    for m in methods:
        t0 = time.perf_counter()
        entry: dict = {"label": m.label}
        breaks0, graphs0 = dynamo_counts()
        mode = _fail_mode(m.key, fail)
        built = fn = None
        try:
            free(dev)
            before = meter.allocated() if meter else None
            if mode == "build":
                raise InjectedFailure(f"--fail-method {m.key}:build: injected failure while building")
            built = m.build()
            entry.update(built.info)
            fn = built.fn
            if mode == "run":
                fn = _failing(fn, m.key, warmup)
            warm = []
            for i in range(warmup):
                sync(dev)
                ts = time.perf_counter()
                out = fn()
                sync(dev)
                warm.append(time.perf_counter() - ts)
                if i == 0 and isinstance(out, torch.Tensor):
                    entry["first_loss"] = float(out)
            entry["warmup_ms"] = round_ms(warm)
            entry.update(built.info)  # what the warm-up calls recorded (e.g. the NF4 decode backend used)
            if meter:
                entry["resident_bytes"] = max(0, meter.allocated() - before)
            live[m.key] = fn
            if built.cleanup:
                cleanups.append(built.cleanup)
        except Skipped as e:
            entry["skipped"] = str(e)
        except Exception as e:  # recorded; the suite goes on
            entry["error"] = error_text(e) + " (while building / warming up)"
            if built is not None and built.cleanup:
                _quiet(built.cleanup)
        built = fn = None  # a failed method's model is freed before the next one is built
        breaks1, graphs1 = dynamo_counts()
        entry["graph_breaks"], entry["graphs_compiled"] = breaks1 - breaks0, graphs1 - graphs0
        entry["build_s"] = round(time.perf_counter() - t0, 2)
        res[m.key] = entry
        state = ("skipped: " + entry["skipped"]) if "skipped" in entry else entry.get("error") or (
            f"warm-up ms {entry['warmup_ms']}")
        log(f"  built {m.label:34s} {entry['build_s']:7.1f} s  {state}")
    return res, live, cleanups


def _quiet(fn):
    try:
        fn()
    except Exception:
        pass


def time_rounds(res: dict, live: dict, dev: str, meter, iters: int, *, deadline: float | None = None,
                min_iters: int = 3, tokens: dict | None = None, log=print) -> dict:
    """Interleaved timed rounds over ``live`` (key -> fn); fills ``res`` entries. Returns round info.

    The number of rounds is ``iters``, or fewer (not below ``min_iters``) when the first round
    shows that ``iters`` rounds would pass ``deadline``.
    """
    times = {k: [] for k in live}
    step_peak = {k: 0 for k in live}
    n, i, t_start = iters, 0, time.perf_counter()
    breaks0, graphs0 = dynamo_counts()
    gc.collect()
    gc.disable()
    try:
        while i < n and live:
            r0 = time.perf_counter()
            keys = list(live)
            order = keys[i % len(keys):] + keys[: i % len(keys)]
            if (i // len(keys)) % 2:
                order = order[::-1]
            for k in order:
                failed = None
                try:
                    sync(dev)
                    if meter:
                        meter.reset_peak()
                        a = meter.allocated()
                    ts = time.perf_counter()
                    live[k]()
                    sync(dev)
                    t = time.perf_counter() - ts
                    if meter:
                        step_peak[k] = max(step_peak[k], meter.peak() - a)
                    times[k].append(t)
                except Exception as e:  # recorded; the method leaves the rounds, the others go on
                    failed = error_text(e) + f" (in timed round {i})"
                if failed:  # freed outside the except block: its traceback holds the failed call's tensors
                    res[k]["error"] = failed
                    res[k]["partial_times_ms"] = round_ms(times.pop(k))
                    del live[k]
                    gc.enable()
                    free(dev)
                    gc.disable()
                    log(f"  {res[k]['label']}: {failed}")
            if i == 0 and deadline is not None:
                per_round = time.perf_counter() - r0
                fit = int((deadline - time.perf_counter()) / max(per_round, 1e-9)) + 1
                n = max(min(iters, fit), min_iters)
            i += 1
    finally:
        gc.enable()
    breaks1, graphs1 = dynamo_counts()
    for k, ts in times.items():
        e = res[k]
        ms = round_ms(ts)
        e.update(spread(ms))
        e["times_ms"] = ms
        if tokens and k in tokens:
            e["tokens_per_s"] = tokens[k] / (e["median_ms"] / 1e3)
        if meter and "resident_bytes" in e:
            e["step_peak_bytes"] = max(0, step_peak[k])
            e["peak_bytes"] = e["resident_bytes"] + e["step_peak_bytes"]
    return {"rounds": i, "rounds_planned": n, "seconds": round(time.perf_counter() - t_start, 2),
            "graph_breaks_while_timed": breaks1 - breaks0, "graphs_compiled_while_timed": graphs1 - graphs0}


def run_methods(methods: list[Method], dev: str, meter, *, warmup: int, iters: int, fail: list[str],
                deadline: float | None = None, min_iters: int = 3, tokens: dict | None = None, log=print):
    """build_all + time_rounds + cleanups. Returns (entries by key, round info)."""
    res, live, cleanups = build_all(methods, dev, meter, warmup, fail, log)
    try:
        rounds = time_rounds(res, live, dev, meter, iters, deadline=deadline, min_iters=min_iters,
                             tokens=tokens, log=log)
    finally:
        live.clear()
        for c in cleanups:
            _quiet(c)
        free(dev)
    return res, rounds
