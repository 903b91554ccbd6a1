"""What lorafit's loop calls on the task it trains: :class:`Trainable`.

The engine knows no task by name; anything that subclasses :class:`Trainable` can be trained by
:class:`~lorafit.train.loop.Trainer` (the tasks of :mod:`lorafit.tasks` do, through
``lorafit.tasks.base.LoopTask``; so does a test's toy regression).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
import torch.nn as nn


class Trainable(abc.ABC):
    """The loop's contract. Losses are *sums*: the loop divides them by the global item count of
    the step, which makes gradient accumulation and several processes exact for token losses too.
    """

    primary_metric: ClassVar[str]  # the eval metric that picks best/ (a key evaluate returns)
    greater_is_better: ClassVar[bool]

    @abc.abstractmethod
    def collate(self, rows: list) -> dict[str, Any]:
        """One micro-batch of tensors, on CPU."""

    @abc.abstractmethod
    def count(self, batch: dict[str, Any]) -> int:
        """Number of loss items in ``batch`` (examples, or target tokens)."""

    def num_tokens(self, batch: dict[str, Any]) -> int:
        """Input tokens of ``batch``, for tokens/s (default: :meth:`count`)."""
        return self.count(batch)

    @abc.abstractmethod
    def loss_sum(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The loss summed over the :meth:`count` items of ``batch``."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, rows: list, batch_size: int, device: torch.device) -> dict[str, float]:
        """Metrics on ``rows``; keys start with ``eval_`` (``primary_metric`` among them)."""
