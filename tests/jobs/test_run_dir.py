"""Never lose a run: --out / --overwrite / --resume checks before loading, corrupt checkpoints, leftovers.

Each refusal is checked three ways: exit code 2 and one ``lorafit: error:`` line naming the
culprit, the run directory byte for byte as it was, and no model loaded (``job.build`` is
replaced by a function that fails the test), so the check runs before anything expensive.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from lorafit.cli import main
from lorafit.common import files
from lorafit.train import checkpoint as ckpt
from lorafit.jobs import rundir
from lorafit.jobs import train as job
from lorafit.common.errors import Interrupted, LorafitError
from lorafit.jobs.train import run_train


def flags(tiny_bert, cls_data, out=None, **kw) -> dict[str, str]:
    train, ev = cls_data
    base = {"model": str(tiny_bert), "train": str(train), "eval": str(ev), "batch_size": "8", "epochs": "2",
            "lr": "5e-3", "log_every": "1000"}
    if out is not None:
        base["out"] = str(out)
    base.update({k: str(v) for k, v in kw.items()})
    return base


def argv(d: dict[str, str]) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in d.items()]


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorafit: error: ") and "Traceback" not in err, err
    return lines[0][len("lorafit: error: "):]


@pytest.fixture
def no_model(monkeypatch):
    """A refusal must come before the model is built: building fails the test."""

    def build(*_a, **_k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(job, "build", build)


@pytest.fixture(scope="module")
def interrupted_run(tiny_bert, cls_data, tmp_path_factory):
    """A run stopped by SIGTERM after step 7 of 24 (checkpoint.pt, no adapter/)."""
    run = tmp_path_factory.mktemp("interrupted") / "run"

    def kill(step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        run_train(flags(tiny_bert, cls_data, run, rank=8), on_step=kill)
    assert (run / ckpt.CHECKPOINT).is_file() and not (run / "adapter").exists()
    return run


@pytest.fixture
def run_copy(interrupted_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(interrupted_run, dst)
    return dst


# ------------------------------------------------------------------ --out / --overwrite
def test_out_holding_a_run_is_refused_and_overwrite_leaves_nothing_stale(tiny_bert, cls_data, tmp_path, capsys,
                                                                         monkeypatch):
    run = tmp_path / "run"
    assert main(["train", *argv(flags(tiny_bert, cls_data, run, epochs=1, eval_every=6))]) == 0
    assert (run / "best" / "adapter_model.safetensors").is_file()
    before = snapshot(run)
    capsys.readouterr()

    real_build = job.build
    monkeypatch.setattr(job, "build", lambda *a: pytest.fail("model loaded before the refusal"))
    assert main(["train", *argv(flags(tiny_bert, cls_data, run, rank=2))]) == 2
    assert one_error(capsys) == (
        f"--out {run}: holds a run (adapter, best, config.yaml, loss.png, ...); add --overwrite to replace it, "
        f"--resume {run} to continue it, or choose another --out"
    )
    assert snapshot(run) == before

    monkeypatch.setattr(job, "build", real_build)
    assert main(["train", "--overwrite", *argv(flags(tiny_bert, cls_data, run, rank=2, epochs=1))]) == 0
    assert not (run / "best").exists()  # the old run's best/ (r=8) is gone with the rest
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 2
    config = (run / "config.yaml").read_text()
    assert "rank: 2" in config and "overwrite" not in config
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["adapter", "config.yaml", "loss.png", "metrics.json", "metrics.jsonl"]
    )


def test_out_refusals_before_loading(tiny_bert, cls_data, run_copy, tmp_path, capsys, no_model, monkeypatch):
    base = flags(tiny_bert, cls_data)
    # an interrupted run: its checkpoint is not deleted by a new run
    before = snapshot(run_copy)
    assert main(["train", *argv(base), "--out", str(run_copy)]) == 2
    assert one_error(capsys).startswith(f"--out {run_copy}: holds a run (")
    assert snapshot(run_copy) == before
    # --overwrite deletes only what a run writes
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    (other / "adapter").mkdir()
    assert main(["train", *argv(base), "--out", str(other), "--overwrite"]) == 2
    assert one_error(capsys) == (
        f"--out {other}: --overwrite replaces only a lorafit run's files, and notes.txt is not one; "
        "move it or choose another --out"
    )
    assert (other / "notes.txt").read_text() == "keep me" and (other / "adapter").is_dir()
    # a file, a path under a file, a directory that cannot be written
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["train", *argv(base), "--out", str(afile)]) == 2
    assert one_error(capsys) == f"--out {afile}: exists and is not a directory"
    assert main(["train", *argv(base), "--out", str(afile / "run")]) == 2
    assert one_error(capsys) == f"--out {afile / 'run'}: {afile} is a file, not a directory"
    assert afile.read_text() == "x"

    def denied(*_a, **_k):  # what a read-only directory gives (root ignores chmod, so it is simulated)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(rundir.tempfile, "mkstemp", denied)
    fresh = tmp_path / "a" / "b" / "run"
    assert main(["train", *argv(base), "--out", str(fresh)]) == 2
    assert one_error(capsys) == f"--out {fresh}: cannot write there (Permission denied)"
    assert not (tmp_path / "a").exists()  # the probe removed the directories it created


def test_empty_out_is_accepted_and_the_probe_leaves_nothing(tiny_bert, cls_data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".config.yaml.k1.tmp").write_text("rank:")  # a start killed at its first write: cleaned
    opts, run = job.prepare(flags(tiny_bert, cls_data, empty))
    assert run is None and opts["out"] == str(empty) and opts["overwrite"] is False
    assert list(empty.iterdir()) == []
    opts, _ = job.prepare(flags(tiny_bert, cls_data, tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists()


def test_default_run_directory_is_fresh_even_in_the_same_second(tiny_bert, cls_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir.time, "strftime", lambda *_a: "20260101-000000")
    first = run_train(flags(tiny_bert, cls_data, epochs=1))
    second = run_train(flags(tiny_bert, cls_data, epochs=1, seed=1))
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["text-classification-20260101-000000", "text-classification-20260101-000000-2"]
    for name, metrics in zip(runs, (first, second)):
        assert json.loads((tmp_path / "runs" / name / "metrics.json").read_text()) == json.loads(json.dumps(metrics))

    def fail(*_a):
        raise LorafitError("stop")

    monkeypatch.setattr(job, "build", fail)
    with pytest.raises(LorafitError, match="stop"):
        run_train(flags(tiny_bert, cls_data, epochs=1))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs  # no empty directory left


# ------------------------------------------------------------------ --resume
def test_resume_refuses_changed_options_before_writing_then_resumes(run_copy, tmp_path, capsys, no_model,
                                                                    monkeypatch):
    (run_copy / ".metrics.json.abc.tmp").write_text("{")  # a leftover: a refused resume keeps it too
    before = snapshot(run_copy)
    assert main(["train", "--resume", str(run_copy), "--rank", "4", "--batch-size", "4", "--lr", "1e-3"]) == 2
    assert one_error(capsys) == (
        f"--resume {run_copy}: cannot change rank (8 -> 4), batch-size (8 -> 4), lr (0.005 -> 0.001) of a run "
        "(they fix the adapter's shapes, the data order or the schedule); start a new run with --out"
    )
    assert snapshot(run_copy) == before
    cfg = tmp_path / "job.yaml"
    cfg.write_text("seed: 3\nlog-every: 5\n")  # a --config file is the user's too; log-every may change
    assert main(["train", "--resume", str(run_copy), "--config", str(cfg)]) == 2
    assert one_error(capsys).startswith(f"--resume {run_copy}: cannot change seed (0 -> 3) of a run (")
    assert main(["train", "--resume", str(run_copy), "--overwrite"]) == 2
    assert one_error(capsys).startswith("--overwrite cannot go with --resume")
    assert main(["train", "--resume", str(run_copy), "--out", str(tmp_path / "elsewhere")]) == 2
    elsewhere = tmp_path / "elsewhere"
    assert one_error(capsys) == f"--resume {run_copy} and --out {elsewhere} name different runs; give one of them"
    assert snapshot(run_copy) == before

    monkeypatch.undo()  # the model may load now
    import yaml

    model = yaml.safe_load((run_copy / "config.yaml").read_text())["model"]
    allowed = ["--log-every", "5", "--eval-batch-size", "16", "--model", f"{model}/."]  # the same directory
    assert main(["train", "--resume", str(run_copy), *allowed]) == 0
    assert "resuming" in capsys.readouterr().out
    assert not (run_copy / ckpt.CHECKPOINT).exists() and (run_copy / "adapter").is_dir()
    assert not (run_copy / ".metrics.json.abc.tmp").exists()
    assert json.loads((run_copy / "metrics.json").read_text())["steps"] == 24


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 8)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zero(path: Path) -> None:
    path.write_bytes(b"")


def _code(path: Path) -> None:  # a pickle that would run code: refused by weights_only
    torch.save({"step": 3, "f": os.getcwd, "trainable": {}}, path)


@pytest.mark.parametrize("spoil", [_garbage, _truncated, _zero, _code], ids=lambda f: f.__name__.strip("_"))
def test_resume_on_a_corrupt_checkpoint_is_one_line_and_changes_nothing(run_copy, capsys, no_model, spoil):
    path = run_copy / ckpt.CHECKPOINT
    spoil(path)
    (run_copy / ".adapter.xyz.tmp").mkdir()  # not cleaned either: the refused resume writes nothing
    before = snapshot(run_copy)
    assert main(["train", "--resume", str(run_copy)]) == 2
    line = one_error(capsys)
    assert line.startswith(f"{path}: ") and "the run directory was not changed" in line, line
    assert snapshot(run_copy) == before and (run_copy / ".adapter.xyz.tmp").is_dir()


def test_resume_checks_the_checkpoint_against_the_run(run_copy, capsys):
    path = run_copy / ckpt.CHECKPOINT
    state = torch.load(path, weights_only=True)
    ckpt.save_checkpoint(run_copy, {**state, "world": 2})
    assert main(["train", "--resume", str(run_copy)]) == 2
    assert one_error(capsys) == (
        f"{path}: the run was trained on 2 process(es), this is 1; resume it with the same number "
        "(each step's rows and RNG states are per process)"
    )
    name = next(iter(state["trainable"]))
    bad = {**state["trainable"], name: torch.zeros(3, 3)}
    ckpt.save_checkpoint(run_copy, {**state, "trainable": bad})
    assert main(["train", "--resume", str(run_copy)]) == 2
    assert f"{name} (3, 3) vs" in one_error(capsys)


def test_restore_trainable_checks_everything_before_copying():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    saved = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    saved["1.weight"] = torch.ones(2, 3)  # the last one does not fit
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(LorafitError, match=r"shapes \['1\.weight \(2, 3\) vs \(2, 2\)'\]"):
        ckpt.restore_trainable(model, saved)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # not half-restored


# ------------------------------------------------------------------ leftovers of a killed save
def test_resume_start_cleans_leftovers_and_restores_an_old_copy(run_copy, capsys, monkeypatch):
    (run_copy / ".adapter.k1.tmp").mkdir()
    (run_copy / ".adapter.k1.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    (run_copy / ".checkpoint.pt.k2.tmp").write_bytes(b"half")
    (run_copy / "best.old").mkdir()  # killed between replace_dir's two renames: best/ is missing
    (run_copy / "best.old" / "adapter_config.json").write_text("{}")
    (run_copy / "adapter.old").mkdir()  # an old copy beside a complete adapter/ is just removed
    (run_copy / "adapter").mkdir()
    before = (run_copy / ckpt.CHECKPOINT).read_bytes()

    def stop(*_a):
        raise LorafitError("stop after the checks")

    monkeypatch.setattr(job, "build", stop)
    assert main(["train", "--resume", str(run_copy)]) == 2
    assert one_error(capsys) == "stop after the checks"
    names = sorted(p.name for p in run_copy.iterdir())
    assert not [n for n in names if n.endswith((".tmp", ".old"))], names
    assert (run_copy / "best" / "adapter_config.json").read_text() == "{}"
    assert (run_copy / ckpt.CHECKPOINT).read_bytes() == before


# ------------------------------------------------------------------ the adapter swap
def _write(d: Path, tag: str) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors", "labels.json"):
        (d / name).write_text(f"{tag}:{name}")


def _complete(d: Path) -> str | None:
    """'old' / 'new' when ``d`` holds one whole copy, else None."""
    if not d.is_dir():
        return None
    texts = {p.name: p.read_text() for p in d.iterdir()}
    for tag in ("old", "new"):
        if texts == {n: f"{tag}:{n}" for n in ("adapter_config.json", "adapter_model.safetensors", "labels.json")}:
            return tag
    return None


def _swap_killed_before(final: Path, crash_at: int, use_exchange: bool) -> int:
    """Run replace_dir in a forked child that dies (os._exit, like kill -9) just before its
    ``crash_at``-th file-system change (rename, exchange or tree removal); returns the exit code
    (0: it finished first)."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 3
        try:
            calls = [0]

            def gate(fn):
                def wrapped(*a, **k):
                    calls[0] += 1
                    if calls[0] == crash_at:
                        os._exit(9)
                    return fn(*a, **k)

                return wrapped

            files.exchange = gate(files.exchange) if use_exchange else (lambda a, b: False)
            os.replace = gate(os.replace)
            shutil.rmtree = gate(shutil.rmtree)
            files.replace_dir(final, lambda d: _write(d, "new"))
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="renameat2 is Linux's")
@pytest.mark.parametrize("use_exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_complete_adapter_is_on_disk_at_every_instant_of_the_swap(tmp_path, use_exchange):
    if use_exchange:  # the atomic path must really be available here, or the test proves nothing
        a, b = tmp_path / "a", tmp_path / "b"
        a.mkdir()
        b.mkdir()
        (a / "x").touch()
        assert files.exchange(a, b) and (b / "x").exists() and not (a / "x").exists()
    seen = []
    for crash_at in range(1, 10):
        run = tmp_path / f"run{crash_at}"
        run.mkdir()
        (run / "adapter").mkdir()
        _write(run / "adapter", "old")
        code = _swap_killed_before(run / "adapter", crash_at, use_exchange)
        state = _complete(run / "adapter")
        if use_exchange:
            assert state is not None, (crash_at, sorted(p.name for p in run.iterdir()))
        else:  # the fallback may leave adapter/ missing for an instant, never without adapter.old
            assert state is not None or _complete(run / "adapter.old") == "old", crash_at
        rundir.clean_leftovers(run)
        after = _complete(run / "adapter")
        assert after is not None and sorted(p.name for p in run.iterdir()) == ["adapter"], crash_at
        seen.append(after)
        if code == 0:
            assert after == "new"
            break
        assert code == 9
    assert seen[0] == "old" and seen[-1] == "new" and len(seen) == (3 if use_exchange else 4)
