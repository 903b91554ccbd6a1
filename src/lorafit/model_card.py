"""The model card (README.md) written into every adapter directory, as PEFT writes one.

PEFT-style front matter (``library_name: peft``, so the Hub lists the directory as a PEFT adapter),
then what a reader needs: the base, task type, rank / alpha / targets, the adapter's share of the
base, the run's metrics when given, and how to load it with lorafit and with PEFT. The card carries
`CARD_MARK`, so a save replaces its own card but never a README.md the user wrote.
"""

from __future__ import annotations

import math

from .config import LoraConfig

CARD_NAME = "README.md"
CARD_MARK = "<!-- lorafit model card: rewritten by every save; delete this line to keep your own edits -->"
# PEFT's loader class for each task type, and the transformers class of the base
_AUTO_CLASS = {"CAUSAL_LM": "AutoPeftModelForCausalLM", "SEQ_CLS": "AutoPeftModelForSequenceClassification",
               "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM", "TOKEN_CLS": "AutoPeftModelForTokenClassification",
               "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
               "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction"}
_AUTO_BASE = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
              "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
              "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}


def _fmt(value) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.6g}"
    return str(value)


def model_card(config: LoraConfig, base: str | None, task_type: str | None, targets: list[str],
               adapter_params: int, base_params: int, embeddings: list[str], metrics: dict | None) -> str:
    """The README.md of an adapter directory (PEFT-style front matter, so the Hub lists it as a PEFT adapter).

    Args:
        targets: the adapted module names; adapter_params / base_params: element counts (the share
            shown is adapter / base); embeddings: PEFT keys of saved embedding layers; metrics: name -> value.
    """
    names = sorted({t.rsplit(".", 1)[-1] for t in targets})
    share = 100 * adapter_params / base_params if base_params else 0.0
    where = base or "<base model>"
    rows = [("base model", f"`{where}`"), ("task type", task_type or "none (PeftModel)"),
            ("rank / alpha", f"{config.r} / {_fmt(float(config.alpha))}" + (" (rsLoRA)" if config.use_rslora else "")),
            ("target modules", f"{', '.join(f'`{n}`' for n in names)} ({len(targets)} layers)"),
            ("adapter parameters", f"{adapter_params:,d} ({share:.3f}% of the base model's {base_params:,d})")]
    if config.modules_to_save:
        rows.append(("modules saved in full", ", ".join(f"`{m}`" for m in config.modules_to_save)))
    if config.use_dora:
        rows.append(("variant", "DoRA"))
    if embeddings:
        rows.append(("resized vocabulary", "saved with the adapter: " + ", ".join(f"`{e}`" for e in embeddings)))
    lines = ["---", f"base_model: {where}" if base else "base_model: null", "library_name: peft",
             "tags:", "- lora", "- lorafit", "---", CARD_MARK, "", f"# LoRA adapter for {where}", "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---:|",
                  *[f"| {k} | {_fmt(v)} |" for k, v in metrics.items()], ""]
    auto_base = _AUTO_BASE.get(task_type or "", "AutoModel")
    resize = "model.resize_token_embeddings(...)  # to the saved vocabulary first\n" if embeddings else ""
    base_line = f'model = {auto_base}.from_pretrained("{where}")'
    lines += ["## Load it", "", "With lorafit:", "", "```python", "import lorafit",
              f"from transformers import {auto_base}", "", base_line,
              resize + 'lorafit.load_adapter(model, "path/to/adapter")', "```", "", "With PEFT:", "", "```python",
              "from peft import PeftModel", f"from transformers import {auto_base}", "", base_line,
              'model = PeftModel.from_pretrained(model, "path/to/adapter")', "```", ""]
    if task_type in _AUTO_CLASS:
        lines += [f'or `peft.{_AUTO_CLASS[task_type]}.from_pretrained("path/to/adapter")`.', ""]
    return "\n".join(lines)


def is_lorafit_card(text: str) -> bool:
    """True when a README.md is one `model_card` wrote (so a save may replace it)."""
    return CARD_MARK in text
