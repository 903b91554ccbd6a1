"""benchmarks/gpu_suite.py --dry-run: the GPU suite's code paths at tiny shapes on the CPU.

One subprocess run (about 35 s on 2 shared cores; part of the normal suite) with failures injected
through the hidden --fail-method flag: full fine-tuning raises in its first timed round, one
inference variant raises while it is built, and the --big section raises as a whole. The suite
must record each with its error, keep timing everything else, and still write the JSON and the
markdown. Everything not injected must have finite positive times for every round.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
TRAIN = ["frozen_floor", "lorafit", "lorafit_compiled", "peft", "peft_compiled", "lorafit_dora",
         "lorafit_qlora_nf4", "peft_qlora_bnb_nf4", "full_ft"]
INFER = ["base", "lorafit", "lorafit_mixed8", "lorafit_mixed8_ctx", "peft", "peft_mixed8"]
FAIL = ["full_ft", "lorafit_mixed8_ctx:build", "section:big"]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _run(args, timeout):
    return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=ROOT)


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite")
    args = ["--dry-run", "--big", "--out", str(out)] + [a for f in FAIL for a in ("--fail-method", f)]
    p = _run(args, timeout=170)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    [js] = out.glob("gpu-suite-*.json")
    [md] = out.glob("gpu-suite-*.md")
    assert js.stem == md.stem and js.stem.startswith("gpu-suite-cpu-dry-run-")
    return json.loads(js.read_text()), md.read_text(), p.stdout


def _positive(xs):
    return bool(xs) and all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in xs)


def _timed_ok(e, rounds):
    assert "error" not in e, e.get("error")
    assert len(e["times_ms"]) == rounds and _positive(e["times_ms"]), e
    assert _positive([e["median_ms"], e["p25_ms"], e["p75_ms"], e["tokens_per_s"]]) and _positive(e["warmup_ms"])


def test_meta_records_versions_and_the_setting(dry):
    m = dry[0]["meta"]
    assert m["dry_run"] is True and m["device"] == "cpu" and m["date"]
    for k in ("torch", "transformers", "peft", "lorafit"):
        assert m[k][0].isdigit(), (k, m[k])
    assert (m["r"], m["alpha"], m["dtype"]) == (16, 32, "float32")
    assert m["wall_s"] > 0 and not m["over_8_minutes"]


def test_every_training_method_is_timed_with_finite_positive_numbers(dry):
    result = dry[0]
    train, rounds = result["train"], result["train_rounds"]["rounds"]
    assert rounds == 3 and set(TRAIN) <= set(train)
    for key in TRAIN:
        e = train[key]
        if key == "full_ft" or (key == "peft_qlora_bnb_nf4" and "skipped" in e):
            continue
        _timed_ok(e, rounds)
        assert math.isfinite(e["first_loss"]) and e["first_loss"] > 0
        assert _positive(e["x_floor"].values())
        if e.get("peak_bytes") is not None:  # the CPU stand-in meter (RSS), or null
            assert math.isfinite(e["peak_bytes"]) and e["peak_bytes"] >= 0
    if "skipped" in train["peft_qlora_bnb_nf4"]:
        assert "bitsandbytes" in train["peft_qlora_bnb_nf4"]["skipped"]
    # with identical base weights and B = 0 at init, every LoRA method starts at the floor's loss
    floor_loss = train["frozen_floor"]["first_loss"]
    for key in ("lorafit", "lorafit_compiled", "peft", "peft_compiled", "lorafit_dora"):
        assert train[key]["first_loss"] == pytest.approx(floor_loss, rel=1e-4), key
    assert train["lorafit_qlora_nf4"]["nf4_backend_after_step"] == "torch"  # the Triton kernel is CUDA-only
    assert train["lorafit_compiled"]["graph_breaks"] == 0 and train["lorafit_compiled"]["graphs_compiled"] >= 1
    assert "lorafit_compiled / peft_compiled" in result["train_pairs"]
    assert result["train_rounds"]["graphs_compiled_while_timed"] == 0  # no recompiles across steps


def test_every_inference_variant_is_timed_and_the_mixed_batch_matches_peft(dry):
    result = dry[0]
    infer, rounds = result["infer"], result["infer_rounds"]["rounds"]
    assert set(INFER) == set(infer)
    for key in INFER:
        if key == "lorafit_mixed8_ctx":
            continue
        for ph in ("prefill", "decode"):
            _timed_ok(infer[key][ph], rounds)
            assert _positive(infer[key][ph]["x_base"].values())
    [check] = result["checks"]
    assert check["ok"] is True, check


def test_a_failing_method_is_recorded_and_the_suite_goes_on(dry):
    result, md, stdout = dry
    full = result["train"]["full_ft"]
    assert "InjectedFailure" in full["error"] and "timed round 0" in full["error"]
    assert full["partial_times_ms"] == [] and "times_ms" not in full
    for ph in ("prefill", "decode"):  # failed while built; peft, built after it, still ran (checked above)
        assert "while building" in result["infer"]["lorafit_mixed8_ctx"][ph]["error"]
    assert "InjectedFailure" in result["sections"]["big"]["error"]
    assert "error" not in result["sections"]["train"] and "error" not in result["sections"]["infer"]
    assert "-- train:" in stdout and "-- infer:" in stdout and "-- big:" in stdout  # elapsed per section
    assert "note, train full_ft: InjectedFailure" in md


def test_targets_are_reported_met_or_missed_with_numbers(dry):
    result, md, _ = dry
    targets = {t["target"]: t for t in result["targets"]}
    assert len(targets) == 8
    for name, t in targets.items():
        assert t["met"] in (True, False), (name, t)  # everything they need was measured in the dry run
        assert math.isfinite(t["ratio"]) and t["ratio"] > 0 and t["met"] == (t["ratio"] <= t["limit"])
    for header in ("| training step, 2 x 32 |", "| inference, 16 rows |", "| target | result | value |",
                   "| paired ratio (same round) |"):
        assert header in md
    assert "DRY RUN" in md


def test_a_real_run_without_cuda_stops_with_a_clear_message():
    p = _run([], timeout=120)
    assert p.returncode == 1 and "no CUDA device" in p.stderr
