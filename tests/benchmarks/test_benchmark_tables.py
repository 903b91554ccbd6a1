"""The benchmark tables cannot mislead: paired ratios are paired, and the READMEs show the JSON.

Why: the README once set medians (179.1 vs 201.9 ms, which reads as 0.89x) beside paired ratios
(1.15x floor), and compared RSS of processes with different imports. These tests pin (1) the
definition of a paired ratio, (2) that every statistic stored in a committed train_step JSON is
what its per-round times give, (3) that the tables in README.md and benchmarks/README.md are
exactly the ones generated from the committed JSON, (4) that sst2.md is the table of sst2.json and
that its memory columns come from runs with the same imports. No timing happens here.
"""

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_tables  # noqa: E402
import sst2  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TRAIN_JSON = RESULTS / "cpu-small-2026-12-01.json"


def test_paired_ratio_is_median_of_same_round_ratios():
    # rounds: (10 vs 10), (20 vs 10), (30 vs 40): per-round ratios 1, 2, 0.75; the ratio of the
    # medians would be 20 / 10 = 2, the paired median is 1 (all values exact in binary)
    p = bench_tables.paired([10.0, 20.0, 30.0], [10.0, 10.0, 40.0])
    assert p == {"median": 1.0, "p25": 0.875, "p75": 1.5, "n": 3}


def test_paired_ratio_refuses_unpaired_lists():
    with pytest.raises(ValueError, match="one time per round"):
        bench_tables.paired([1.0, 2.0], [1.0])


def test_spread_is_median_and_interquartile_range():
    e = bench_tables.spread([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (e["median_ms"], e["p25_ms"], e["p75_ms"], e["min_ms"], e["max_ms"]) == (3.0, 2.0, 4.0, 1.0, 5.0)


def _train_results():
    out = []
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        train = result.get("train") if isinstance(result, dict) else None
        if isinstance(train, dict) and "paired" in (train.get("lorafit") or {}):  # the current format
            out.append(path)
    return out


def test_a_current_format_result_is_committed():
    assert TRAIN_JSON in _train_results()


@pytest.mark.parametrize("path", _train_results(), ids=lambda p: p.name)
def test_stored_statistics_are_what_the_per_round_times_give(path):
    assert bench_tables.recheck(json.loads(path.read_text())) == []


def _tables_in(md_path):
    return md_path.read_text()


def test_readmes_show_exactly_the_committed_tables():
    result = json.loads(TRAIN_JSON.read_text())
    train_md = bench_tables.markdown(*bench_tables.train_table(result["train"], result["meta"]))
    infer_md = bench_tables.markdown(*bench_tables.infer_table(result["infer"], result["meta"]))
    assert train_md in _tables_in(ROOT / "README.md")
    bench_readme = _tables_in(ROOT / "benchmarks" / "README.md")
    assert train_md in bench_readme
    assert infer_md in bench_readme


def test_no_readme_table_sets_a_ratio_of_medians_beside_paired_ratios():
    # every timing table header in the READMEs names its ratio kind; a bare "x floor" / "x base"
    # column is how medians and paired ratios got mixed before
    for md in (ROOT / "README.md", ROOT / "benchmarks" / "README.md"):
        for line in _tables_in(md).splitlines():
            if not line.startswith("|") or " ms" not in line:
                continue
            for col in line.strip("|").split("|"):
                col = col.strip()
                if re.match(r"x (floor|base|PEFT)\b", col):
                    assert "paired" in col or "of medians" in col, f"{md.name}: column {col!r}"


def test_sst2_md_is_the_table_of_sst2_json():
    saved = json.loads((RESULTS / "sst2.json").read_text())
    md = sst2.table(saved["runs"], saved["timing_rounds"], saved["memory_runs"], saved["meta"]["memory_steps"])
    assert md in (RESULTS / "sst2.md").read_text()


def test_sst2_memory_runs_had_the_same_imports_and_a_training_phase_peak():
    saved = json.loads((RESULTS / "sst2.json").read_text())
    runs = saved["memory_runs"]
    assert {r["method"] for r in runs} == set(sst2.METHODS)
    for r in runs:
        assert r["same_imports"] == list(sst2.SAME_IMPORTS)
        assert r["steps"] == saved["meta"]["memory_steps"]
        m = r["memory"]
        assert m["peak_reset"] and m["train_increase_bytes"] == m["train_peak_bytes"] - m["before_train_bytes"]


def test_readme_sst2_memory_numbers_are_the_tables():
    """Every 'NNN MiB' in README.md's SST-2 paragraph appears in sst2.md's memory columns."""
    readme = _tables_in(ROOT / "README.md")
    para = readme[readme.index("SST-2 (`benchmarks/sst2.py`"):]
    para = para[: para.index("\n\n")]
    # "583 / 584 / 584 MiB": every number of a slash list before MiB
    lists = re.findall(r"((?:\d[\d,]*\s*/\s*)*\d[\d,]*) MiB", para)
    numbers = [n.strip() for lst in lists for n in lst.split("/")]
    assert len(numbers) >= 9, f"README.md's SST-2 paragraph quotes too little memory: {numbers}"
    table_cells = set(re.findall(r"\b\d+\b", (RESULTS / "sst2.md").read_text()))
    for n in numbers:
        assert n.replace(",", "") in table_cells, f"README.md SST-2 paragraph: {n} MiB is not in sst2.md"


def test_readme_llm_table_is_the_committed_json():
    """README.md's SmolLM2 / SST-2 table is llm_sst2.table of the committed runs (the LoRA pair, then QLoRA)."""
    import llm_sst2

    runs = [RESULTS / "llm-sst2-cpu-2026-12-01.json", RESULTS / "llm-sst2-qlora-cpu-2026-12-01.json"]
    results = llm_sst2.merged_results(runs)
    assert {"zero-shot", "lorafit", "peft", "qlora"} <= set(results)
    assert llm_sst2.table(results) in (ROOT / "README.md").read_text()
