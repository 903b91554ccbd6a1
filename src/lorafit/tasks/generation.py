"""Quality in task terms for a causal LM: exact match of greedy generations against references.

An eval row of the causal-lm task is ``(ids, labels)`` with ``labels`` -100 where there is no loss
(:mod:`lorafit.tasks.causal_lm`). For a prompt/completion or chat row the prompt is every token
before the first target and the reference is the first run of target tokens (the completion, or
the first assistant turn); a plain-text row (its first token is already a target) has no prompt
and is not scored.

Generation is batched: prompts are left-padded (so every row's next token sits in the last
column), decoded greedily with the KV cache, each row stopping on its own at EOS or at a special
token that ends the references (a chat template's end-of-turn marker, e.g. ``<|im_end|>``,
when it is not the tokenizer's EOS). A row gets at
most ``len(reference) + 8`` new tokens: enough to finish a correct answer and to show that a wrong
one is wrong, without paying for long rambling answers.

:func:`normalize` makes the comparison robust to what does not change an answer: case, the
Unicode form, runs of white space and one trailing period. Punctuation inside is kept (a JSON
answer stays JSON).
"""

from __future__ import annotations

import re
import unicodedata

import torch
import torch.nn as nn

IGNORE = -100
EXTRA_TOKENS = 8


def normalize(text: str) -> str:
    """Lower case, NFKC, white space collapsed, stripped, one trailing period dropped."""
    text = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    return re.sub(r"\.$", "", text).strip()


def prompt_and_reference(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]] | None:
    """``(prompt ids, reference ids)`` of an eval row, or None when it has no prompt (plain text)."""
    cut = next((i for i, t in enumerate(labels) if t != IGNORE), None)
    if not cut:  # no target at all, or a target from the first token (plain text)
        return None
    end = next((i for i in range(cut, len(labels)) if labels[i] == IGNORE), len(labels))
    return ids[:cut], ids[cut:end]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts -> (input_ids [n, L], attention_mask [n, L]), padding on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def greedy(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, pad_id: int, stop_ids: list[int],
           device: torch.device) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (one batch), each cut before its first stop token."""
    ids, mask = left_pad(prompts, pad_id)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, use_cache=True, pad_token_id=pad_id,
                         eos_token_id=stop_ids or None, temperature=None, top_p=None, top_k=None)
    rows = out[:, ids.shape[1]:].tolist()
    return [row[: next((i for i, t in enumerate(row) if t in stop_ids), len(row))] for row in rows]


def stop_tokens(tokenizer, references: list[list[int]]) -> list[int]:
    """EOS plus the special tokens found in the references (a chat template's end of turn): where an answer stops."""
    special = set(tokenizer.all_special_ids)
    ends = {ref[i] for ref in references for i in range(len(ref)) if ref[i] in special}
    return sorted(ends | ({tokenizer.eos_token_id} - {None}))


def turn_end(tokenizer) -> str | None:
    """The text a chat template puts after an assistant message (``<|im_end|>`` ...), else None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    sentinel = "\u2063lorafit-answer\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}],
                                         tokenize=False)
    end = text[text.rindex(sentinel) + len(sentinel):].strip()
    return end or None


def answer_text(tokenizer, ids: list[int], ends: list[str]) -> str:
    """Decoded ``ids`` up to the first end marker (special tokens kept while cutting, then removed)."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    text = text[: min((i for i in (text.find(e) for e in ends if e) if i >= 0), default=len(text))]
    for special in tokenizer.all_special_tokens:
        text = text.replace(special, "")
    return text


def exact_match(model: nn.Module, tokenizer, rows: list, batch_size: int, device: torch.device, pad_id: int,
                ends: list[str]) -> dict[str, float]:
    """``{"eval_exact_match": share of scored rows, "eval_generated": rows scored}``; {} when no row has a prompt.

    ``ends`` are the texts that end an answer (EOS, a chat template's end of turn): a reference and
    a generation are both cut at the first one, so an answer matches when the model said exactly
    the reference and then ended its turn (or went on after the marker, which is no longer its
    answer). ``model`` may be compiled (``--compile``): generation runs on the original module,
    whose weights are the same tensors. The model's train/eval mode is restored afterwards.
    """
    pairs = [p for p in (prompt_and_reference(ids, labels) for ids, labels in rows) if p is not None]
    if not pairs:
        return {}
    model = getattr(model, "_orig_mod", model)
    was_training = model.training
    model.eval()
    stop_ids = stop_tokens(tokenizer, [ref for _, ref in pairs])
    hits = 0
    try:
        # similar lengths together: less padding, and rows of a batch finish at about the same step
        order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), len(pairs[i][1])))
        for start in range(0, len(order), batch_size):
            chunk = [pairs[i] for i in order[start:start + batch_size]]
            longest = max(len(ref) for _, ref in chunk)
            generated = greedy(model, [p for p, _ in chunk], longest + EXTRA_TOKENS, pad_id, stop_ids, device)
            for (_, ref), gen in zip(chunk, generated):
                expected = normalize(answer_text(tokenizer, ref, ends))
                hits += normalize(answer_text(tokenizer, gen, ends)) == expected
    finally:
        model.train(was_training)
    return {"eval_exact_match": hits / len(pairs), "eval_generated": float(len(pairs))}
