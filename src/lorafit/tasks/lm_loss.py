"""Next-token loss with the output layer run only on the positions that carry a label.

A causal LM's forward ends in ``lm_head``: hidden [B, L, H] -> logits [B, L, V]. With a loss on
completions or assistant turns only, most positions have no label, and their logits are computed,
kept for backward and upcast for the loss for nothing: at SmolLM2's 49k vocabulary that is 200 KB
of fp32 logits per token, and the head is a fifth of the model's FLOPs (the gradient of its input
as much again). A forward pre-hook on the output layer hands it only the K labelled positions
([1, K, H]), so the forward returns logits [1, K, V]; whatever the model does after the head
(logit scaling, soft-capping) is elementwise and still applies. The loss is the same sum over the
same tokens; the tests check loss and gradients against the full computation.

The full path is kept where a hook cannot see the forward as it runs: a ``torch.compile``d model
(a data-dependent selection would break its graph), a model without ``get_output_embeddings``,
or a head that is called on anything but the [B, L, H] hidden states.
"""

from __future__ import annotations

import torch
import torch.nn as nn

IGNORE = -100


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, L] -> the label each position predicts [B, L] (the next token's; IGNORE at the end).

    The labels move left instead of the logits: ``logits[:, :-1]`` would copy the whole [B, L, V].
    """
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1)


def output_layer(model: nn.Module) -> nn.Module | None:
    """The module whose forward makes the logits, or None when the labelled-only path cannot be used."""
    if hasattr(model, "_orig_mod"):  # torch.compile'd: keep its graph whole
        return None
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def next_token_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """Summed cross-entropy of the next-token predictions at every labelled position.

    Args:
        model: a transformers causal LM (its forward returns ``.logits``).
        input_ids: [B, L]; labels: [B, L] with IGNORE where there is no loss.
        kwargs: further forward inputs (``attention_mask``, ``position_ids``).
    Returns:
        a scalar fp32 tensor: the sum over labelled positions (the caller divides by the count).
    """
    target = shifted_labels(labels)
    head = output_layer(model)
    if head is None:
        return _full(model, input_ids, target, kwargs)
    index = (target != IGNORE).flatten().nonzero().squeeze(1)  # [K] positions of the flattened [B * L]
    used = []

    def select(module, args):
        hidden = args[0]
        if not (isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and hidden.shape[:2] == target.shape):
            return None  # the head sees something else: leave it, the full path below takes over
        used.append(True)
        return (hidden.flatten(0, 1).index_select(0, index)[None], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        logits = model(input_ids=input_ids, **kwargs).logits
    finally:
        handle.remove()
    if used == [True] and logits.shape[:2] == (1, index.numel()):
        return nn.functional.cross_entropy(logits[0].float(), target.flatten().index_select(0, index),
                                           reduction="sum")
    if not used:  # the hook declined: these are the full logits
        return _loss(logits, target)
    return _full(model, input_ids, target, kwargs)  # the head ran more than once: nothing to map, run it plainly


def _full(model, input_ids, target, kwargs) -> torch.Tensor:
    return _loss(model(input_ids=input_ids, **kwargs).logits, target)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE,
                                       reduction="sum")
