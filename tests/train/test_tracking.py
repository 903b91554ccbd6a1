"""--report-to: TensorBoard event files read back, resume, W&B / MLflow calls, missing packages."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import pytest

from tests.train.test_loop import ToyTask, toy_model, toy_opts, toy_rows

from lorafit.cli import main
from lorafit.common.errors import LorafitError
from lorafit.train import checkpoint as ckpt
from lorafit.train.distributed import Dist
from lorafit.train.loop import Trainer
from lorafit.train.tracking import parse_report_to, scalars

pytest.importorskip("tensorboard")


def read_events(run):
    """{tag: [(step, value)]} as TensorBoard itself loads RUN/tensorboard/ (restarts purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), purge_orphaned_data=True)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def jsonl(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_events_match_jsonl(run):
    events, records = read_events(run), jsonl(run)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [s for s, _ in events["train/loss"]] == [r["step"] for r in train]
    assert [v for _, v in events["train/loss"]] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [v for _, v in events["train/learning_rate"]] == pytest.approx([r["lr"] for r in train], rel=1e-6)
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in events["eval/loss"]] == \
        [(r["step"], r["eval_loss"]) for r in evals]
    return events


def test_tensorboard_events_hold_loss_lr_and_eval(tmp_path):
    run = tmp_path / "run"
    Trainer(toy_model(), ToyTask(), toy_rows(), toy_rows(16, seed=1), toy_opts(report_to="tensorboard"),
            Dist(), run).fit()
    events = assert_events_match_jsonl(run)
    assert [s for s, _ in events["eval/loss"]] == [0, 4, 8, 12]  # before training, then --eval-every 4
    assert len({v for _, v in events["train/learning_rate"]}) > 2  # warmup + decay, not one constant


def test_tensorboard_after_resume_has_each_step_once(tmp_path):
    """A run dies at step 7 with its last checkpoint at step 5: the resumed run redoes steps 6 and 7,
    and TensorBoard must show them once, with the values of the resumed run (as metrics.jsonl)."""
    rows, ev = toy_rows(), toy_rows(16, seed=1)
    run = tmp_path / "run"

    def crash(step):
        if step == 7:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        Trainer(toy_model(), ToyTask(), rows, ev, toy_opts(report_to="tensorboard", save_every=5), Dist(), run,
                on_step=crash).fit()
    state = ckpt.load_checkpoint(run)
    assert state["step"] == 5
    Trainer(toy_model(), ToyTask(), rows, ev, toy_opts(report_to="tensorboard"), Dist(), run).fit(resume=state)
    assert len(os.listdir(run / "tensorboard")) == 2  # one event file per process run
    events = assert_events_match_jsonl(run)
    assert [s for s, _ in events["train/loss"]] == list(range(1, 13))


def test_no_tracker_writes_nothing_and_other_ranks_report_nothing(tmp_path):
    Trainer(toy_model(), ToyTask(), toy_rows(), None, toy_opts(), Dist(), tmp_path / "a").fit()
    assert not (tmp_path / "a" / "tensorboard").exists()
    Trainer(toy_model(), ToyTask(), toy_rows(), None, toy_opts(report_to="tensorboard"), Dist(), None).fit()
    assert not any(tmp_path.rglob("tensorboard"))


def test_wandb_and_mlflow_get_the_same_scalars(tmp_path, monkeypatch):
    """The calls lorafit makes, on stand-in modules (wandb / mlflow are not installed here)."""
    calls = []
    run_obj = types.SimpleNamespace(log=lambda values, step: calls.append(("wandb", step, dict(values))),
                                    finish=lambda: calls.append(("wandb-finish",)))
    wandb = types.SimpleNamespace(init=lambda **kw: calls.append(("wandb-init", kw)) or run_obj)
    mlflow = types.SimpleNamespace(
        active_run=lambda: None,
        start_run=lambda **kw: calls.append(("mlflow-start", kw)),
        log_params=lambda p: calls.append(("mlflow-params", p)),
        log_metrics=lambda values, step: calls.append(("mlflow", step, dict(values))),
        end_run=lambda: calls.append(("mlflow-end",)))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    run = tmp_path / "run"
    Trainer(toy_model(), ToyTask(), toy_rows(), toy_rows(16, seed=1), toy_opts(report_to="wandb,mlflow"),
            Dist(), run).fit()
    init = calls[0]
    assert init[0] == "wandb-init" and init[1]["id"] == "run" and init[1]["config"]["report_to"] == "wandb,mlflow"
    expected = [(r["step"], scalars(r)) for r in jsonl(run)]
    for name in ("wandb", "mlflow"):
        got = [(c[1], c[2]) for c in calls if c[0] == name]
        assert got == expected, name
    assert ("mlflow-start", {"run_name": "run", "nested": False}) in calls
    assert calls[-2:] == [("wandb-finish",), ("mlflow-end",)]


def test_a_tracker_that_cannot_start_is_one_line_and_closes_the_log(tmp_path, monkeypatch):
    def init(**kw):
        raise RuntimeError("api_key not configured (no-tty)\nrun wandb login")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    trainer = Trainer(toy_model(), ToyTask(), toy_rows(), None, toy_opts(report_to="tensorboard,wandb"), Dist(),
                      tmp_path / "run")
    with pytest.raises(LorafitError) as info:
        trainer.fit()
    assert str(info.value) == "--report-to wandb: could not start (RuntimeError: api_key not configured (no-tty))"
    assert trainer.step == 0 and (tmp_path / "run" / "metrics.jsonl").read_text() == ""


def test_report_to_values():
    assert parse_report_to("none") == [] and parse_report_to(None) == []
    assert parse_report_to("TensorBoard, tensorboard") == ["tensorboard"]
    with pytest.raises(LorafitError, match="unknown tracker 'comet'"):
        parse_report_to("tensorboard,comet")
    with pytest.raises(LorafitError, match="'none' cannot go with a tracker"):
        parse_report_to("none,tensorboard")
    for name in ("wandb", "mlflow"):  # not installed here; no stand-in: the real lookup
        if importlib.util.find_spec(name) is None:
            with pytest.raises(LorafitError, match=rf"the package {name} is not installed \(pip install {name}\)"):
                parse_report_to(f"tensorboard,{name}")
    assert scalars({"kind": "eval", "step": 3, "eval_accuracy": 0.5, "eval_loss": 1.0}) == {
        "eval/accuracy": 0.5, "eval/loss": 1.0}


def test_report_to_from_a_yaml_list(tmp_path):
    from lorafit.jobs.options import all_options, load_yaml

    (tmp_path / "a.yaml").write_text("report_to: [tensorboard, none]\n")
    (tmp_path / "b.yaml").write_text("report-to:\n  - tensorboard\n")
    (tmp_path / "c.yaml").write_text("report_to: {tensorboard: 1}\n")
    assert load_yaml(tmp_path / "a.yaml", all_options()) == {"report_to": "tensorboard,none"}  # refused later
    assert load_yaml(tmp_path / "b.yaml", all_options()) == {"report_to": "tensorboard"}
    with pytest.raises(LorafitError, match="c.yaml: report_to: expected a comma list or a list of strings"):
        load_yaml(tmp_path / "c.yaml", all_options())


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_missing_tracker_is_one_line_with_the_pip_command(tracker, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lorafit.train.tracking.installed", lambda name: name != tracker)
    code = main(["train", "--report-to", f"tensorboard,{tracker}", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"lorafit: error: --report-to {tracker}: the package {tracker} is not "
                                 f"installed (pip install {tracker})")
    assert not (tmp_path / "run").exists()  # refused before the model or the run directory


def test_overwrite_removes_the_old_event_files(tmp_path):
    from lorafit.jobs import rundir

    run = tmp_path / "run"
    Trainer(toy_model(), ToyTask(), toy_rows(), None, toy_opts(report_to="tensorboard"), Dist(), run).fit()
    (run / "config.yaml").write_text("rank: 2\n")
    assert any((run / "tensorboard").iterdir())
    rundir.check_new_run(str(run), True)  # --overwrite: tensorboard/ is a run entry, not a foreign file
    rundir.clear_old_run(str(run))
    assert not (run / "tensorboard").exists()
