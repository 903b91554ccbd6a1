#!/usr/bin/env python3
"""Plant known faults in lorafit's core one at a time and check that the tests catch each one.

    python scripts/mutation_check.py                 # every mutant (a few minutes on 2 cores)
    python scripts/mutation_check.py --list          # the mutants, their tests, and whether each still applies
    python scripts/mutation_check.py --only merge_sign --only io_prefix
    python scripts/mutation_check.py --source head   # the last commit, not uncommitted edits
    python scripts/mutation_check.py --tests tests/property   # what the property layer alone catches

Each mutant is an exact string replacement in one source file; the script refuses to run if a
mutant's text does not occur exactly once, or a test path it names is gone (update the mutant).
The work is done on a throw-away copy of the working tree (PYTHONPATH points the tests at the
copy's src/), so other work in the checkout never sees a mutated file; the mutated file is
restored in a ``finally`` anyway, also on Ctrl-C / SIGTERM. For each mutant only the tests that
matter run, in order, with ``pytest -x``: the first failure is "the test that caught it". The
catching tests are re-run on the unmutated copy: one that fails without the fault proves nothing.

Exit status: 0 when every mutant testable here is caught; 1 when one is not (or its catching test
also fails without the fault); 2 when a mutant no longer applies. A mutant whose tests need
something missing here (triton) is "not testable here", a failure only with --strict. Not run in
CI (it runs the same tests many times); run it before a submission.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import io
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv*", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache",
                                "runs", "build", "*.egg-info", "*.pyc")

# test subsets, fastest and most direct first (-x stops at the first failure)
PEFT = "tests/api/test_peft_parity.py"
# CORE: the former tests/core: tests/api but test_compile.py (~2 min, no compile-only mutant), and tests/layers
CORE = [*(f"tests/api/test_{n}.py" for n in ("adapters", "functional", "io", "io_bad_files", "multi_adapter")), PEFT,
        "tests/layers"]
LINEAR = ["tests/api/test_functional.py", "tests/api/test_adapters.py", "tests/property/test_prop_linear.py",
          "tests/property/test_prop_saved.py"]
CONV = ["tests/layers/test_conv.py", *CORE, "tests/property/test_prop_conv.py"]
IO = ["tests/api/test_io.py", PEFT, "tests/property/test_prop_linear.py", "tests/property/test_prop_conv.py"]
MERGE = ["tests/api/test_adapters.py", "tests/layers/test_conv.py", "tests/property/test_prop_linear.py",
         "tests/property/test_prop_conv.py"]
DORA = ["tests/variants/test_dora.py", "tests/property/test_prop_dora.py"]
QUANT = ["tests/quant/test_quant_formats.py", "tests/quant/test_quant_layers.py", "tests/quant/test_quant_lora.py",
         "tests/quant", "tests/property/test_prop_quant.py"]
SAVED = ["tests/api/test_functional.py", "tests/property/test_prop_saved.py", *CORE]
MULTI = [*CORE, "tests/property/test_prop_saved.py", "tests/property/test_prop_linear.py"]
TRITON = ["tests/quant/test_quant_triton.py"]
BATCH = ["tests/api/test_adapters.py", "tests/property/test_prop_adapters.py"]
MHA = [PEFT, "tests/api/test_adapters.py", "tests/property/test_prop_mha.py"]


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]
    needs: str | None = None  # a module the catching tests import (skipped without it)


def m(name, file, old, new, tests, needs=None) -> Mutant:
    return Mutant(name, file, old, new, tuple(tests), needs)


F, B, C = "src/lorafit/functional.py", "src/lorafit/layers/base.py", "src/lorafit/layers/conv.py"
L, IOF, D = "src/lorafit/layers/linear.py", "src/lorafit/io.py", "src/lorafit/variants/dora.py"
QF, QL, QT = "src/lorafit/quant/formats.py", "src/lorafit/quant/layers.py", "src/lorafit/quant/triton_nf4.py"
E, MH = "src/lorafit/layers/embedding.py", "src/lorafit/layers/mha.py"

MUTANTS = [
    # scaling
    m("scaling_dropped_fused", F, "_flat(y).addmm_(xa, b.t(), alpha=scaling)", "_flat(y).addmm_(xa, b.t(), alpha=1.0)",
      LINEAR),
    m("scaling_squared", B, "self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)",
      "self.scaling = (self.alpha / (math.sqrt(r) if use_rslora else r)) ** 2", LINEAR),
    m("rslora_ignored", B, "self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)",
      "self.scaling = self.alpha / r", LINEAR + [PEFT]),
    m("scaling_dropped_lora_add", F, "_flat(y).addmm_(xa, lora_b.to(dtype).t(), alpha=scaling)",
      "_flat(y).addmm_(xa, lora_b.to(dtype).t(), alpha=1.0)", LINEAR),
    m("scaling_dropped_lora_add_no_grad", F, "_flat(y).addmm_(xa, lora_b.to(y.dtype).t(), alpha=scaling)",
      "_flat(y).addmm_(xa, lora_b.to(y.dtype).t(), alpha=1.0)", LINEAR),
    m("scaling_dropped_embedding", E, "a, b = ad.lora_A, ad.lora_B * ad.scaling", "a, b = ad.lora_A, ad.lora_B",
      [PEFT, "tests/property/test_prop_linear.py"]),
    m("mha_scaling_dropped", MH, "w = w + (ad.lora_B.to(w.dtype) @ ad.lora_A.to(w.dtype)) * ad.scaling",
      "w = w + (ad.lora_B.to(w.dtype) @ ad.lora_A.to(w.dtype))", MHA),
    m("mha_out_proj_merge_sign", MH, "new_out = base.out_proj.weight + self._out_delta(name)",
      "new_out = base.out_proj.weight - self._out_delta(name)", MHA),
    # adapter key names in io (adapter_tensors is the key map of save AND load: a lorafit round trip stays consistent)
    m("io_lora_A_B_swapped", "src/lorafit/peft_format.py", "out[key_a], out[key_b] = part.lora_A, part.lora_B",
      "out[key_a], out[key_b] = part.lora_B, part.lora_A", IO),
    m("io_prefix", "src/lorafit/peft_format.py", 'PREFIX = "base_model.model."', 'PREFIX = "base_model."', IO),
    m("io_load_slots_swapped", IOF, "lora.setdefault(path, {})[suffix] = (PREFIX + key, val)",
      'lora.setdefault(path, {})[{"lora_A.weight": "lora_B.weight", "lora_B.weight": "lora_A.weight"}.get(suffix, '
      "suffix)] = (PREFIX + key, val)", IO),
    # conv arguments in the adapter path
    m("conv_stride_ignored", C, "return self._fn(x, weight, None, base.stride, padding, base.dilation, groups)",
      "return self._fn(x, weight, None, 1, padding, base.dilation, groups)", CONV),
    m("conv_dilation_ignored", C, "return self._fn(x, weight, None, base.stride, padding, base.dilation, groups)",
      "return self._fn(x, weight, None, base.stride, padding, 1, groups)", CONV),
    m("conv_padding_mode_ignored", C, 'if base.padding_mode != "zeros":', "if False:", CONV),
    m("conv_groups_ignored", C, "g = self.groups if a_groups is None else a_groups",
      "g = 1 if a_groups is None else a_groups", CONV),
    m("conv1d_gpt2_merge_not_transposed", L, "            delta = delta.t()\n", "            pass\n",
      MERGE + [PEFT, "tests/variants"]),
    # merge sign
    m("merge_sign", B, "new = weight.float() + self.delta_weight(self.adapters[name]).float()",
      "new = weight.float() - self.delta_weight(self.adapters[name]).float()", MERGE),
    m("unmerge_sign", B, "weight.copy_((weight.float() - self.delta_weight(self.adapters[name]).float()).to(",
      "weight.copy_((weight.float() + self.delta_weight(self.adapters[name]).float()).to(", MERGE),
    # DoRA
    m("dora_norm_dim", L, "return (1, -1) if self.fan_in_fan_out else (-1, 1)",
      "return (-1, 1) if self.fan_in_fan_out else (1, -1)", DORA),
    m("dora_norm_cross_term", D, "sq = w_sq + 2 * scaling * cross + scaling * scaling * low",
      "sq = w_sq + scaling * cross + scaling * scaling * low", DORA),
    m("dora_norm_cache_ignores_A", D, "key = (id(w), w._version, a._version, b._version, float(s), w.device,",
      "key = (id(w), w._version, b._version, float(s), w.device,", DORA),
    m("dora_weight_sq_cache_stale", D, "sq_key = key[:2]", "sq_key = key[:1]", DORA),
    m("dora_conv_padding_mode", C, "z = self.conv_a(x, base.weight, base.groups)  # the base conv without its bias",
      "z = self._fn(x, base.weight, None, base.stride, base.padding, base.dilation, base.groups)", DORA),
    # NF4 block mapping: torch path and Triton kernel
    m("nf4_block_off_by_one", QF, "w = words.view(torch.float32).view(n_blocks, -1).mul_(scale[:, None])",
      "w = words.view(torch.float32).view(n_blocks, -1).mul_(scale.roll(1)[:, None])", QUANT),
    m("nf4_nibble_order", QF, "out[i : i + step] = (idx[:, 0::2] << 4) | idx[:, 1::2]",
      "out[i : i + step] = (idx[:, 1::2] << 4) | idx[:, 0::2]", QUANT),
    m("triton_half_block", QT, "blk = offs // HALF_BLOCK", "blk = (offs + 1) // HALF_BLOCK", TRITON, "triton"),
    m("triton_block_off_by_one", QT, "scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)",
      "scale = tl.load(absmax_ptr + blk + 1, mask=mask, other=0.0)", TRITON, "triton"),
    # several active adapters
    m("multi_adapter_loop", L, "elif check_shareable(live) or all(ad.dropout == 0 for ad in live):", "elif False:",
      MULTI),
    m("conv_multi_adapter_scaling", C, "b = torch.cat([(ad.lora_B * ad.scaling).reshape(",
      "b = torch.cat([(ad.lora_B).reshape(", CONV),
    m("multi_adapter_cat_scaling", B, "b = torch.cat([ad.lora_B * ad.scaling for ad in live], 1)",
      "b = torch.cat([ad.lora_B for ad in live], 1)", MULTI),
    # mixed-adapter batches (adapter_batch)
    m("batch_rows_shifted", L, "xa = torch.bmm(x3, a_stack[rows].transpose(1, 2))",
      "xa = torch.bmm(x3, a_stack[rows.roll(1)].transpose(1, 2))", BATCH),
    m("batch_conv_scaling_dropped", C, "                scale[i] = ad.scaling", "                scale[i] = 1.0",
      BATCH),
    m("batch_linear_scale_dropped", L, ".mul_(scale[rows].view(n, 1, 1))", "", BATCH),
    m("share_wrong_slot", "src/lorafit/layers/batched.py", "repoint(ad.lora_A, a_slot(i, ad.r))",
      "repoint(ad.lora_A, a_slot(0, ad.r))",
      ["tests/layers/test_batched_share.py", *BATCH]),
    m("share_inference_tensors", "src/lorafit/layers/batched.py",
      "with torch.inference_mode(False) if share else contextlib.nullcontext(), torch.no_grad():",
      "with torch.no_grad():", ["tests/layers/test_batched_share.py"]),
    m("batch_stack_cache_stale", "src/lorafit/layers/batched.py", "if hit is not None and hit[0] == versions and",
      "if hit is not None and", BATCH),
    # the layer loop of set_adapter is tree.activate now (inject's re-activation goes through it too)
    m("set_adapter_first_only", "src/lorafit/tree.py", "layer.set_active(names)", "layer.set_active(names[:1])",
      BATCH + CORE),
    m("inject_leaves_train_mode", "src/lorafit/inject.py",
      "            item.wrapper.train(item.wrapper.base_layer.training)\n", "", ["tests/api/test_adapters.py"]),
    # tensors saved for backward
    m("saved_extra_copy_of_x", F, "ctx.save_for_backward(x, xa, weight, lora_a, lora_b)",
      "ctx.save_for_backward(x.detach().clone(), xa, weight, lora_a, lora_b)", SAVED),
    m("saved_x_for_frozen_w_dropout", F, "ctx.save_for_backward(x if weight.requires_grad else None, x_lora,",
      "ctx.save_for_backward(x.detach().clone(), x_lora,", SAVED),
    m("saved_upcast_x", F, "ctx.save_for_backward(x_lora, xa, lora_a, lora_b)",
      "ctx.save_for_backward(x_lora.float(), xa, lora_a, lora_b)", SAVED),
    # quantized merge error
    m("quant_merge_error_constant", QL,
      "return (self._decode(self._storage(), torch.float32) - target).abs().max().item()", "return 0.01", QUANT),
    # the application's newer parts (issues 13-15): generation-based exact match, GGUF export, PEFT files, serving
    m("em_right_padded_ids", "src/lorafit/tasks/generation.py", "        ids[i, width - len(p):] = torch.tensor(p)",
      "        ids[i, :len(p)] = torch.tensor(p)", ["tests/tasks/test_llm.py"]),
    m("em_answer_not_cut_at_turn_end", "src/lorafit/tasks/generation.py",
      "    text = text[: min((i for i in (text.find(e) for e in ends if e) if i >= 0), default=len(text))]\n", "",
      ["tests/tasks/test_llm.py"]),
    m("gguf_no_qk_permute", "src/lorafit/export/gguf_write.py", "            data = llama_permute(data, heads)",
      "            data = data", ["tests/export/test_gguf_tiny.py"], needs="gguf"),
    m("save_pretrained_not_adapter", IOF, '        out["save_pretrained"] = AdapterSavePretrained(model)',
      "        pass", ["tests/api/test_peft_files.py", "tests/integrations/test_hf_trainer.py"], needs="trl"),
    m("task_type_not_inferred", IOF, 'data["task_type"] = config.task_type or infer_task_type(model)',
      'data["task_type"] = config.task_type', ["tests/api/test_peft_files.py"]),
    m("resized_vocab_unchecked", "src/lorafit/peft_format.py",
      "        if saved is not None and saved.dim() == 2 and saved.shape[0] != weight.shape[0]:", "        if False:",
      ["tests/api/test_peft_files.py"]),
    m("serve_evict_keeps_adapter", "src/lorafit/serve/adapters.py",
      "            lorafit.delete_adapter(self.model, key)", "            pass", ["tests/serve/test_serve_causal.py"],
      needs="fastapi"),
    m("serve_adapters_not_cast", "src/lorafit/serve/adapters.py", "ad.to(self.dtype)", "pass",
      ["tests/serve/test_serve_causal.py"], needs="fastapi"),
    m("serve_never_trims", "src/lorafit/serve/engine.py",
      "if self.metrics.loads + self.metrics.evictions != churn:", "if False:", ["tests/serve/test_serve_causal.py"],
      needs="fastapi"),
    m("lm_loss_unshifted_targets", "src/lorafit/tasks/lm_loss.py",
      "target.flatten().index_select(0, index),", "labels.flatten().index_select(0, index),",
      ["tests/tasks/test_lm_loss.py"]),
    m("lm_loss_wrong_positions", "src/lorafit/tasks/lm_loss.py",
      "hidden.flatten(0, 1).index_select(0, index)[None]", "hidden.flatten(0, 1).index_select(0, index.roll(1))[None]",
      ["tests/tasks/test_lm_loss.py"]),
    m("logprobs_not_cut_at_stop", "src/lorafit/serve/generate.py", "if cut is not None and start >= cut:",
      "if False:", ["tests/serve/test_serve_causal.py"], needs="fastapi"),
    m("echo_scores_ignore_left_padding", "src/lorafit/serve/generate.py",
      "every[i, width - len(rows[i].ids):]", "every[i, :len(rows[i].ids)]", ["tests/serve/test_serve_causal.py"],
      needs="fastapi"),
    m("token_bytes_from_text", "src/lorafit/serve/generate.py",
      "    piece = tok.convert_ids_to_tokens(token_id)\n",
      "    return tok.decode([token_id]).encode('utf-8')\n", ["tests/serve/test_batching.py"], needs="fastapi"),
    m("fingerprint_not_rounded", "src/lorafit/fingerprint.py",
      "(values if rounding is None else values.to(rounding))", "values",
      ["tests/api/test_io.py"]),
]


class Interrupted(Exception):
    pass


def _on_term(signum, frame):  # SIGTERM: unwind through the finally blocks like Ctrl-C
    raise Interrupted(f"signal {signum}")


def make_copy(source: str) -> tuple[Path, Path]:
    """(temp dir, repo copy) of the working tree (no venvs/caches) or of HEAD; ../shared linked beside it."""
    tmp = Path(tempfile.mkdtemp(prefix="lorafit-mutants-"))
    dest = tmp / ROOT.name
    if source == "head":  # only what is committed: others' uncommitted edits in a shared checkout stay out
        dest.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "HEAD"], capture_output=True,
                                 check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
    else:
        shutil.copytree(ROOT, dest, ignore=IGNORE, symlinks=True)
    shared = ROOT.parent / "shared"
    if shared.exists():
        (tmp / "shared").symlink_to(shared)
    return tmp, dest


def test_env(dest: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(dest / "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                                if p])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    return env


_LIVE: set[subprocess.Popen] = set()  # running pytest processes, killed on interruption
_LIVE_LOCK = threading.Lock()


def kill_live() -> None:
    with _LIVE_LOCK:
        for proc in list(_LIVE):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def run_pytest(dest: Path, env: dict, args: list[str], timeout: float, stop_first: bool = True) -> tuple[int, str]:
    """Run pytest in its own session; kill the whole group on timeout or interruption."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-x"] if stop_first else []), *args]
    proc = subprocess.Popen(cmd, cwd=dest, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    with _LIVE_LOCK:
        _LIVE.add(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return 124, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with _LIVE_LOCK:
            _LIVE.discard(proc)


def failures(output: str) -> list[str]:
    """Node ids of the FAILED / ERROR lines of pytest's short summary (-ra), in order."""
    return re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.M)


def expand(dest: Path, paths) -> list[str]:
    """A directory becomes its test files, those not listed before it left out: pytest merges a file with a
    directory listed after it and runs the directory's files in name order (fastest-first would be lost)."""
    out = []
    for p in paths:
        if "::" not in p and (dest / p).is_dir():
            out += sorted(f.relative_to(dest).as_posix() for f in (dest / p).rglob("test_*.py"))
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def check_applies(mutants, dest: Path, tests: list[str] | None = None) -> list[str]:
    """Why mutants cannot run: text not there exactly once, or a test path gone (it would run nothing)."""
    problems = []
    for mu in mutants:
        n = (dest / mu.file).read_text().count(mu.old) if (dest / mu.file).is_file() else 0
        if n != 1:
            problems.append(f"{mu.name}: {mu.file} contains the mutant's text {n} times (need 1): {mu.old!r}")
        problems += [f"{mu.name}: no test path {t}" for t in dict.fromkeys(tests or mu.tests)
                     if not (dest / t.split("::")[0]).exists()]
    return problems


def run_mutant(mu: Mutant, dest: Path, env: dict, timeout: float, tests: list[str] | None = None) -> dict:
    row = {"name": mu.name, "file": mu.file.removeprefix("src/lorafit/"), "caught": "no", "by": "", "secs": 0.0}
    if mu.needs and importlib.util.find_spec(mu.needs) is None:
        row["caught"] = f"not testable here ({mu.needs} missing)"
        return row
    path = dest / mu.file
    original = path.read_text()
    start = time.monotonic()
    try:
        path.write_text(original.replace(mu.old, mu.new, 1))
        tests = expand(dest, tests or mu.tests)  # every path checked to exist by check_applies
        rc, out = run_pytest(dest, env, tests, timeout)
    finally:
        path.write_text(original)  # always restored: Ctrl-C, SIGTERM, a crash
    row["secs"] = time.monotonic() - start
    failed = next(iter(failures(out)), None)
    if rc == 124:
        row.update(caught="no (timeout)")
    elif rc in (1, 2) and failed:
        row.update(caught="yes", by=failed)
    else:  # say what ran: "49 passed in 11.2s" (pytest's last line), or why it stopped
        last = out.strip().splitlines()[-1].strip("= ")[:80] if out.strip() else ""
        row.update(caught="no" if rc in (0, 5) else f"no (pytest exit {rc})", by=f"({last})" if last else "")
    if mu.needs and row["caught"] == "no" and re.search(r"\bskipped\b", out) and not re.search(r"\bpassed\b", out):
        row["caught"] = f"not testable here ({mu.needs}: tests skipped)"
    return row


def table(rows) -> str:
    head = ("mutant", "file", "caught", "caught by", "s")
    body = [(r["name"], r["file"], r["caught"], r["by"], f"{r['secs']:.1f}") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {:>" + str(widths[-1]) + "}"
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*b) for b in body)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these mutants")
    ap.add_argument("--list", action="store_true", help="list the mutants and their test subsets, then exit")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant before it counts as not caught")
    ap.add_argument("--strict", action="store_true", help="a mutant not testable here (triton missing) fails the run")
    ap.add_argument("--source", choices=("worktree", "head"), default="worktree",
                    help="what to copy and mutate: the working tree as it is (default) or the last commit")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="mutants run at once, each on its own copy (default: 2, or 1 on a 1-core machine)")
    ap.add_argument("--tests", action="append", metavar="PATH",
                    help="run these tests for every mutant instead of each mutant's own subset (e.g. tests/property: "
                         "what that layer alone catches)")
    args = ap.parse_args(argv)
    mutants = [mu for mu in MUTANTS if not args.only or mu.name in args.only]
    if unknown := set(args.only) - {mu.name for mu in MUTANTS}:
        print(f"mutation_check: unknown mutant(s) {sorted(unknown)}; see --list", file=sys.stderr)
        return 2
    if args.list:
        for mu in mutants:
            print(f"{mu.name:28} {mu.file}: {' '.join(expand(ROOT, mu.tests))}")
        problems = check_applies(mutants, ROOT, args.tests)  # the working tree: does each mutant still apply?
        if problems:
            print("mutation_check: these mutants no longer apply:", *problems, sep="\n  ", file=sys.stderr)
            return 2
        return 0
    signal.signal(signal.SIGTERM, _on_term)
    copies = []
    try:
        for _ in range(max(1, args.jobs)):
            copies.append(make_copy(args.source))
        problems = check_applies(mutants, copies[0][1], args.tests)
        if problems:
            print("mutation_check: these mutants no longer apply; update them in scripts/mutation_check.py "
                  "(or the --tests paths):", *problems, sep="\n  ", file=sys.stderr)
            return 2
        for _, dest in copies:
            env = test_env(dest)
            where = subprocess.run([sys.executable, "-c", "import lorafit; print(lorafit.__file__)"], cwd=dest,
                                   env=env, capture_output=True, text=True, check=False).stdout.strip()
            if not where.startswith(str(dest)):
                print(f"mutation_check: the tests would import lorafit from {where or '?'}, not from the copy "
                      f"{dest}; refusing (a mutant would not be seen)", file=sys.stderr)
                return 2
        free: queue.Queue = queue.Queue()
        for _, dest in copies:
            free.put(dest)

        def one(mu: Mutant) -> dict:
            dest = free.get()  # a copy no other worker is mutating now
            try:
                row = run_mutant(mu, dest, test_env(dest), args.timeout, args.tests)
            finally:
                free.put(dest)
            print(f"{row['name']:28} {row['caught']:4} {row['by']} ({row['secs']:.1f} s)", flush=True)
            return row

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(copies))
        try:
            rows = list(pool.map(one, mutants))
        except BaseException:  # Ctrl-C / SIGTERM: stop the running pytests first, then the workers restore
            kill_live()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()
        catchers = sorted({r["by"] for r in rows if r["caught"] == "yes"})
        if catchers:  # each catching test must pass without the fault, else it proves nothing
            dest = copies[0][1]
            rc, out = run_pytest(dest, test_env(dest), catchers, args.timeout, stop_first=False)
            bad = set(failures(out)) if rc != 0 else set()
            if rc not in (0, 1) or (rc == 1 and not bad):
                bad = set(catchers)  # could not tell which: trust none
            for r in rows:
                if r["by"] in bad:
                    r["caught"] = "no (test fails unmutated too)"
        print("\n" + table(rows))
        missed = [r for r in rows if not r["caught"].startswith(("yes", "not testable"))]
        untested = [r for r in rows if r["caught"].startswith("not testable")]
        print(f"\n{len(rows) - len(missed) - len(untested)} of {len(rows)} mutants caught"
              + (f", {len(untested)} not testable here" if untested else "")
              + (f"; NOT caught: {', '.join(r['name'] for r in missed)}" if missed else ""))
        return 1 if missed or (args.strict and untested) else 0
    except (KeyboardInterrupt, Interrupted):
        kill_live()
        print("\nmutation_check: interrupted; the copies are removed, the checkout was never modified",
              file=sys.stderr)
        return 130
    finally:
        kill_live()
        for tmp, _ in copies:
            shutil.rmtree(tmp, ignore_errors=True)

if __name__ == "__main__":
    sys.exit(main())
