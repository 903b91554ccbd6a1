"""The one module walker and the one parameter counter.

Both work on any ``nn.Module`` and know nothing of LoRA: callers say which module types are
leaves (LoRA wrappers, for instance, are walked over as one module) and which parameters are
copies that should not be counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch.nn as nn

# `modules_to_save` keeps the untouched original of a trained module under this attribute
ORIGINAL_MODULE = "original_module"


Visit = tuple[str, nn.Module, "nn.Module | None", "str | None"]


def walk(model: nn.Module, leaves: tuple[type, ...] = (),
         unwrap: Callable[[nn.Module], nn.Module] | None = None) -> Iterator[Visit]:
    """Yield ``(name, module, parent, attribute)`` in ``named_modules`` order, root first (name "").

    Args:
        leaves: modules of these types are yielded but not descended into.
        unwrap: ``module -> the module to visit in its place`` (e.g. a LoRA wrapper -> its base
            layer, to see a model under the names it had before injection); applied repeatedly.
    Unlike ``named_modules`` a module reachable twice is yielded twice (once per parent), which is
    what replacing it in every parent needs.
    """
    stack = [("", model, None, None)]
    while stack:
        name, mod, parent, attr = stack.pop()
        if unwrap is not None:
            inner = unwrap(mod)
            while inner is not mod:
                mod, inner = inner, unwrap(inner)
        yield name, mod, parent, attr
        if isinstance(mod, leaves):
            continue
        children = [(f"{name}.{key}" if name else key, child, mod, key)
                    for key, child in mod._modules.items() if child is not None]
        stack.extend(reversed(children))


def count_parameters(model: nn.Module, originals: bool = True,
                     trainable: Callable[[str, nn.Parameter], bool] | None = None) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameter elements (each shared tensor counted once).

    Args:
        originals: count the untouched originals of ``modules_to_save`` (PEFT's counter does;
            the run summaries do not, since those weights are the base's and never saved twice).
        trainable: ``(name, param) -> bool``; default ``param.requires_grad`` (an EMA copy, whose
            flags are off, passes the names it trains instead).
    """
    is_trainable = trainable or (lambda _name, p: p.requires_grad)
    n_trainable = total = 0
    for name, p in model.named_parameters():
        if not originals and f".{ORIGINAL_MODULE}." in f".{name}":
            continue
        total += p.numel()
        if is_trainable(name, p):
            n_trainable += p.numel()
    return n_trainable, total
