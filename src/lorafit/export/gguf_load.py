"""What the GGUF exports share: the base of a causal-LM adapter, the LoRA model, the prompt set, logit checks.

The base is named by the adapter's ``lorafit_job.json`` (``"task": "causal-lm"``, ``"model"``:
``smollm2``, a ``.gguf`` path or a transformers directory) unless ``--model`` overrides it; an
adapter directory without that file (e.g. PEFT's) needs ``--model``. The architecture is
checked on the config alone, before any weight is read. The base loads in float32 (a GGUF base is
dequantized by transformers), the adapter with :func:`lorafit.load_adapter` (a base-fingerprint
mismatch is an error: an adapter on other weights gives a wrong model).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import lorafit
from lorafit.common.errors import LorafitError
from lorafit.common.files import read_json
from lorafit.export.gguf_meta import check_architecture
from lorafit.integrations.gguf import GgufSource, gguf_source
from lorafit.tasks import resolve_model_path
from lorafit.tasks.base import load_checked

# a fixed prompt set: chat turns (through the model's chat template when it has one) and plain text
PROMPTS = (
    ("chat", "What is the capital of France?"),
    ("chat", "Write a haiku about the sea."),
    ("chat", "My order arrived broken. What should I do?"),
    ("chat", "Give me three tips to sleep better."),
    ("text", "The quick brown fox jumps over the lazy dog. Then the dog"),
    ("text", "def fibonacci(n):\n    if n < 2:\n        return n\n    return"),
    ("text", "Once upon a time, in a small village by the mountains, there lived"),
    ("text", "The three primary colors are red, yellow and"),
)


@dataclass
class LoraBase:
    """A causal-LM adapter on its base: ``model`` carries the adapter (unmerged, eval mode).

    ``spec`` is the base as named (job file or ``--model``), ``path`` where it is on disk,
    ``source`` the GGUF file when the base is one (None: a transformers directory) and ``reader``
    its ``gguf.GGUFReader`` (its metadata is carried over to the exports).
    """

    spec: str
    path: Path
    source: GgufSource | None
    arch: str
    config: Any
    tokenizer: Any
    model: nn.Module
    adapter_dir: Path
    reader: Any = None


def base_spec(adapter_dir: Path, model: str | None) -> str:
    """The base model of a causal-LM adapter (``--model`` first, else its ``lorafit_job.json``)."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise LorafitError(f"{adapter_dir}: not an adapter directory (no adapter_config.json)")
    job_file = adapter_dir / "lorafit_job.json"
    job = read_json(job_file)
    task = job.get("task")
    if task is not None and task != "causal-lm":
        raise LorafitError(f"{job_file}: task {task!r}; the GGUF export takes causal-lm adapters only")
    spec = model or job.get("model")
    if not spec:
        why = f"no \"model\" in {job_file}" if job else f"no lorafit_job.json in {adapter_dir}"
        raise LorafitError(f"{adapter_dir}: cannot tell the base model ({why}); give --model")
    return str(spec)


def load_lora_base(adapter_dir, model: str | None = None) -> LoraBase:
    """Load the base of ``adapter_dir`` in float32 with the adapter on it (see the module docstring).

    Raises:
        LorafitError: not a causal-LM adapter, no base given, an unsupported architecture, or an
        adapter that does not fit the base (one line each).
    """
    import transformers  # lazy: seconds to import
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # lazy: seconds to import

    transformers.utils.logging.set_verbosity_error()  # the report is the output, as in `lorafit train`
    transformers.utils.logging.disable_progress_bar()
    adapter_dir = Path(adapter_dir)
    spec = base_spec(adapter_dir, model)
    path = Path(resolve_model_path(spec))
    source = gguf_source(path) if path.suffix.lower() == ".gguf" else None
    reader = None
    if source is not None:  # the architecture from the file itself: transformers' config parse costs seconds
        import gguf  # lazy: optional extra lorafit[gguf]

        directory, kwargs = source.directory, {"gguf_file": source.file}
        reader = gguf.GGUFReader(source.path)
        field = reader.fields.get("general.architecture")
        check_architecture(field.contents() if field is not None else None, spec)
    else:
        directory, kwargs = str(path), {}
        config = AutoConfig.from_pretrained(directory)
        check_architecture(config.model_type, spec, config)
    with quiet_progress():
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()
    arch = check_architecture(base.config.model_type, spec, base.config)  # e.g. a "llama" GGUF read as mistral
    lora = load_checked(lambda: lorafit.load_adapter(base, adapter_dir), adapter_dir).eval()
    return LoraBase(spec, path, source, arch, base.config, tokenizer, lora, adapter_dir, reader)


def prompt_ids(tokenizer) -> list[list[int]]:
    """Token ids of :data:`PROMPTS` (chat prompts with the generation prompt appended)."""
    out = []
    for kind, text in PROMPTS:
        if kind == "chat" and getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                     add_generation_prompt=True)
            out.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        else:
            out.append(tokenizer(text)["input_ids"])
    return out


@torch.inference_mode()
def logits_of(model: nn.Module, ids: list[list[int]]) -> list[torch.Tensor]:
    """Float32 logits ``[len(prompt), vocab]`` of each prompt.

    One batched forward, right-padded with an attention mask: a causal model's logits at the real
    positions do not depend on the padding after them.
    """
    width = max(len(row) for row in ids)
    x = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, row in enumerate(ids):
        x[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    logits = model(input_ids=x, attention_mask=mask).logits.float()
    return [logits[i, : len(row)] for i, row in enumerate(ids)]


def compare_logits(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, Any]:
    """How close ``got`` is to ``ref``, prompt by prompt, every position.

    Returns:
        ``max_abs_diff``, ``max_abs_logit`` (of ``ref``), ``tolerance`` = 1e-2 x max(1, max_abs_logit),
        ``top1_agreement`` (share of positions whose argmax agrees), ``last_top1_agreement`` (the
        next token after each prompt), ``positions``.
    """
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    peak = max(float(a.abs().max()) for a in ref)
    agree = [(a.argmax(-1) == b.argmax(-1)) for a, b in zip(ref, got)]
    n = sum(len(x) for x in agree)
    return {"max_abs_diff": diff, "max_abs_logit": peak, "tolerance": 1e-2 * max(1.0, peak),
            "top1_agreement": sum(int(x.sum()) for x in agree) / n,
            "last_top1_agreement": sum(int(x[-1]) for x in agree) / len(agree), "positions": n}


def read_back(path: Path, tokenizer: bool = True):
    """transformers' reading of a GGUF file: (model in float32, tokenizer or None when not asked for)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: seconds to import

    with quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if tokenizer else None


@contextlib.contextmanager
def quiet_progress():
    """Keep transformers' GGUF progress bar (a bare ``tqdm`` on stderr, which its logging switch does not
    reach) out of the output: the command's stderr is for its one-line errors. Exceptions pass unchanged."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield
