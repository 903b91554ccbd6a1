"""Batched generation with a different adapter per row: left padding, one KV cache, rows finish alone.

One call decodes a batch of prompts together. Row i runs with adapter ``keys[i]`` (None = the
base) through :func:`lorafit.adapter_batch`, so every forward - the prefill [B, T] and each decode
step [B, 1] - is ONE pass of the base with each row's own low-rank update gathered in.

Prompts of different lengths are padded on the left (``attention_mask`` 0 there) and given
``position_ids`` that count real tokens only (mask.cumsum - 1), so each row computes what it
would alone: the tests check a mixed batch against each row run as a batch of one and against
``model.generate`` with the adapter set. A row that ends (EOS, a stop string, ``max_tokens``, or
its client went away) is answered at once and dropped from the batch: the KV cache, mask,
positions and adapter list are cut to the remaining rows (``DynamicCache.batch_select_indices``),
so finished rows cost nothing further.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import inspect

import torch
import torch.nn as nn

import lorafit


@dataclass
class Row:
    """One prompt being decoded.

    Attributes:
        ids: prompt token ids.
        max_tokens: new tokens at most.
        temperature: 0 = greedy (argmax), else sampled from softmax(logits / temperature).
        top_p: nucleus sampling mass (1.0 = off).
        stop: strings that end the text (not included in it), as OpenAI's ``stop``.
        seed: a per-row generator seed (reproducible sampling whatever the batch), or None.
        cancelled: () -> bool, polled every step (a client that disconnected frees its row).
        emit: (text delta) -> None for streaming, or None.
        done: (text, finish_reason, n_generated) -> None, called exactly once.
        logprobs: None = off; k = record each new token's log-probability under the model's own
            distribution (the raw logits: before temperature and top_p) and the k most likely
            alternatives; ``scores`` then holds one :class:`TokenScore` per token of the text.
        echo: with ``logprobs``, also score the prompt's tokens (``prompt_scores``: the first has no
            logprob); ``max_tokens`` 0 then scores the prompt and generates nothing.
    """

    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    cancelled: Callable[[], bool] = lambda: False
    emit: Callable[[str], None] | None = None
    done: Callable[[str, str, int], None] = lambda text, reason, n: None
    out: list[int] = field(default_factory=list)
    sent: int = 0  # characters already emitted
    generator: torch.Generator | None = None
    logprobs: int | None = None
    scores: list = field(default_factory=list)  # per kept token: (id, logprob, [(id, logprob)] top-k)
    pending: tuple = ()  # the scores of the token picked this step, appended if the token is kept
    echo: bool = False  # the answer starts with the prompt (``prompt_text``), scored with logprobs set
    prompt_scores: list = field(default_factory=list)
    prompt_text: str = ""


@dataclass
class TokenScore:
    """One generated token as the response reports it: its text, log-probability, raw bytes, the top
    alternatives (text, log-probability, bytes) and where its text starts in the completion."""

    token: str
    logprob: float | None  # None: a prompt's first token (nothing before it to predict it)
    bytes: bytes
    top: list[tuple[str, float, bytes]]
    offset: int


def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2, Llama 3, SmolLM2) back to bytes: printable bytes stand for
    themselves, the others for the characters from U+0100 on, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in keep}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(0x100 + i): b for i, b in enumerate(others)})
    return table


_BYTE_LEVEL = _byte_level_table()


def token_bytes(tok, token_id: int) -> bytes:
    """A token's raw bytes: a token that ends inside a multi-byte character has no text of its own
    (its decoded text is U+FFFD), but its bytes joined with the next token's decode to the character."""
    piece = tok.convert_ids_to_tokens(token_id)
    decoder = getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)
    if isinstance(piece, str) and type(decoder).__name__ == "ByteLevel" and all(c in _BYTE_LEVEL for c in piece):
        return bytes(_BYTE_LEVEL[c] for c in piece)
    if isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])  # SentencePiece's byte fallback
    return tok.decode([token_id]).encode("utf-8")


def record_scores(logits: torch.Tensor, nxt: torch.Tensor, rows: list[Row]) -> None:
    """For rows with ``logprobs`` set: log_softmax of this step's logits [B, V] -> ``row.pending``."""
    want = [i for i, r in enumerate(rows) if r.logprobs is not None]
    if not want:
        return
    index = torch.tensor(want, device=logits.device)
    lp = torch.log_softmax(logits.index_select(0, index).float(), -1)  # [W, V]
    chosen = lp.gather(1, nxt.index_select(0, index)[:, None])[:, 0].tolist()
    k = max(rows[i].logprobs for i in want)
    top = lp.topk(k, -1) if k else None
    for j, i in enumerate(want):
        kk = rows[i].logprobs
        alts = list(zip(top.indices[j, :kk].tolist(), top.values[j, :kk].tolist())) if kk else []
        rows[i].pending = (chosen[j], alts)


def pick(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """logits [B, vocab] -> next token ids [B]; greedy rows by argmax, the others sampled per row."""
    nxt = logits.argmax(-1)
    for i, row in enumerate(rows):
        if row.temperature <= 0:
            continue
        probs = torch.softmax(logits[i].float() / row.temperature, -1)
        if row.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            cut = (sorted_p.cumsum(-1) - sorted_p) >= row.top_p  # keep the smallest set reaching top_p
            cut[0] = False  # top_p 0: the most likely token alone
            sorted_p[cut] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        if row.seed is not None and row.generator is None:
            row.generator = torch.Generator(device=probs.device).manual_seed(int(row.seed))
        nxt[i] = torch.multinomial(probs, 1, generator=row.generator)[0]
    return nxt


Admit = Callable[[int, set], tuple[list[Row], list]]


def plain_layers(cache) -> list | None:
    """The cache's per-layer objects when each holds plain ``keys`` / ``values`` [B, H, T, D] tensors, else None."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(isinstance(getattr(layer, "keys", None), torch.Tensor)
                             and isinstance(getattr(layer, "values", None), torch.Tensor)
                             and not getattr(layer, "is_sliding", False) for layer in layers):
        return None
    return list(layers)


def join(a: tuple, b: tuple) -> tuple:
    """Two running batches (rows, keys, cache, logits, mask, last) -> one; the shorter is left-padded.

    Padded cache entries are zeros under a 0 in the attention mask: never attended, so each row
    computes what it computed before (positions are per row and unchanged).
    """
    rows_a, keys_a, cache, logits_a, mask_a, last_a = a
    rows_b, keys_b, cache_b, logits_b, mask_b, last_b = b
    width = max(mask_a.shape[1], mask_b.shape[1])
    for la, lb in zip(plain_layers(cache), plain_layers(cache_b)):
        for attr in ("keys", "values"):
            x, y = getattr(la, attr), getattr(lb, attr)
            x = nn.functional.pad(x, (0, 0, width - x.shape[-2], 0))
            y = nn.functional.pad(y, (0, 0, width - y.shape[-2], 0))
            setattr(la, attr, torch.cat([x, y]))
    mask = torch.cat([nn.functional.pad(mask_a, (width - mask_a.shape[1], 0)),
                      nn.functional.pad(mask_b, (width - mask_b.shape[1], 0))])
    return (rows_a + rows_b, keys_a + keys_b, cache, torch.cat([logits_a, logits_b]), mask,
            torch.cat([last_a, last_b]))


def _stop_cut(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` not to stream yet: a partial UTF-8 character or stop string."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class Generator:
    """Decodes batches of :class:`Row` on one causal LM.

    Args:
        model: a transformers causal LM with lorafit adapters (any cache-capable model whose
            forward takes ``attention_mask``, ``position_ids``, ``past_key_values``).
        tokenizer: decodes the new tokens.
        pad_id: the id left padding uses (masked out, never attended).
        eos_ids: ids that end a row.
        on_tokens: (n) -> None, called with the number of tokens produced per step (metrics).
        slots: () -> every resident adapter key in a fixed order (``adapter_batch``'s ``slots``): the
            layers stack those weights once, not again each time rows join, finish or change the mix.
    """

    def __init__(self, model: nn.Module, tokenizer, pad_id: int, eos_ids: set[int],
                 on_tokens: Callable[[int], None] = lambda n: None, slots: Callable[[], tuple | None] = lambda: None):
        self.model, self.tok, self.pad_id, self.eos_ids, self.on_tokens = model, tokenizer, pad_id, eos_ids, on_tokens
        self.slots = slots
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        # transformers 5.2x renamed past_key_values to cache (the old name warns); older ones have only it
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keep_arg = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # prefill: last logits only

    def _text(self, row: Row) -> str:
        return self.tok.decode(row.out, skip_special_tokens=True)

    def _forward(self, keys, all_positions: bool = False, **inputs):
        """(cache, logits of the last position [B, V], or of every position [B, T, V] with ``all_positions``)."""
        with lorafit.adapter_batch(self.model, keys, slots=self.slots(), share_weights=True):
            out = self.model(**inputs, **({} if all_positions else self.keep_arg), use_cache=True)
        cache = out.cache if "cache" in out else out.past_key_values
        return cache, out.logits if all_positions else out.logits[:, -1]

    def _prefill(self, rows: list[Row], keys: list[str | None]):
        """Left-pad and run the prompts: (rows, keys, cache, last logits [B, V], mask [B, T], last position [B])."""
        live = [i for i, r in enumerate(rows) if not r.cancelled()]
        for i in sorted(set(range(len(rows))) - set(live)):
            rows[i].done("", "cancelled", 0)
        if not live:
            return None
        rows, keys = [rows[i] for i in live], [keys[i] for i in live]
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.ids):] = torch.tensor(r.ids)
            mask[i, width - len(r.ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        scored = [i for i, r in enumerate(rows) if r.echo and r.logprobs is not None]
        if scored:  # echo + logprobs: every position's logits (the common batch keeps only the last)
            cache, every = self._forward(keys, all_positions=True, input_ids=ids, attention_mask=mask,
                                         position_ids=pos)
            for i in scored:
                rows[i].prompt_scores = self._prompt_scores(rows[i], every[i, width - len(rows[i].ids):])
            logits = every[:, -1]
        else:
            cache, logits = self._forward(keys, input_ids=ids, attention_mask=mask, position_ids=pos)
        ended = [i for i, r in enumerate(rows) if r.max_tokens == 0]  # echo only: scored, nothing to generate
        if ended:
            for i in ended:
                self._finish(rows[i], "", "length")
            left = [i for i in range(len(rows)) if i not in ended]
            if not left:
                return None
            index = torch.tensor(left, device=self.device)
            cache.batch_select_indices(index)
            rows, keys = [rows[i] for i in left], [keys[i] for i in left]
            logits, mask, pos = logits[index], mask[index], pos[index]
        return rows, keys, cache, logits, mask, pos[:, -1]

    def _prompt_scores(self, row: Row, logits: torch.Tensor) -> list[TokenScore]:
        """The prompt's tokens scored by the logits of its own positions [n, V] (position t predicts t + 1)."""
        lp = torch.log_softmax(logits[:-1].float(), -1)
        chosen = lp.gather(1, torch.tensor(row.ids[1:], device=lp.device)[:, None])[:, 0].tolist()
        top = lp.topk(row.logprobs, -1) if row.logprobs and len(row.ids) > 1 else None
        out = []
        for j, token in enumerate(row.ids):
            alts = [] if top is None or j == 0 else list(zip(top.indices[j - 1].tolist(), top.values[j - 1].tolist()))
            out.append(self._score(token, None if j == 0 else chosen[j - 1], alts,
                                   len(self.tok.decode(row.ids[:j], skip_special_tokens=True))))
        return out

    def _score(self, token: int, logprob: float | None, alts: list[tuple[int, float]], offset: int) -> TokenScore:
        """A token id, its log-probability and its alternatives' (id, log-probability) as the response shows them."""
        return TokenScore(self.tok.decode([token]), logprob, token_bytes(self.tok, token),
                          [(self.tok.decode([t]), v, token_bytes(self.tok, t)) for t, v in alts], offset)

    @torch.inference_mode()
    def run(self, rows: list[Row], keys: list[str | None], admit: Admit | None = None) -> None:
        """Decode every row to its end; each row's ``done`` is called as soon as it finishes.

        ``admit(n_live, live_keys) -> (rows, keys)``, when given, is asked between decode steps for
        rows that arrived meanwhile: they are prefilled on their own and joined to the running
        batch (both KV caches left-padded to one length), so a new request waits one step, not
        for the whole batch to end.
        """
        state = self._prefill(rows, keys)
        while state is not None:
            rows, keys, cache, logits, mask, last = state
            nxt = pick(logits, rows)
            record_scores(logits, nxt, rows)
            self.on_tokens(len(rows))
            keep = [i for i, (row, t) in enumerate(zip(rows, nxt.tolist())) if not self._step(row, t)]
            state = None
            if keep:
                if len(keep) < len(rows):
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    rows, keys = [rows[i] for i in keep], [keys[i] for i in keep]
                    nxt, mask, last = nxt[index], mask[index], last[index]
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], 1)
                last = last + 1
                cache, logits = self._forward(keys, input_ids=nxt[:, None], attention_mask=mask,
                                              position_ids=last[:, None], **{self.cache_arg: cache})
                state = rows, keys, cache, logits, mask, last
            if admit is None or (state is not None and plain_layers(cache) is None):
                continue  # a cache this module cannot join (sliding window, old transformers): finish the batch
            new_rows, new_keys = admit(len(rows) if state else 0, set(keys) if state else set())
            joined = self._prefill(new_rows, new_keys) if new_rows else None
            if joined is not None and state is not None:
                joined = join(state, joined)
            state = joined or state

    def _step(self, row: Row, token: int) -> bool:
        """Add ``token`` to ``row``; True (and ``row.done`` called) when the row is finished."""
        if row.cancelled():  # answered like any other end (scores included): a shutdown still replies
            return self._finish(row, self._text(row), "cancelled")
        if token in self.eos_ids:
            return self._finish(row, self._text(row), "stop")
        row.out.append(token)
        if row.logprobs is not None:
            row.scores.append((token, *row.pending))
        text = self._text(row)
        cut = _stop_cut(text, row.stop) if row.stop else None
        if cut is not None:
            return self._finish(row, text[:cut], "stop", cut=True)
        if len(row.out) >= row.max_tokens:
            return self._finish(row, text, "length")
        if row.emit is not None:
            upto = len(text) - _held_back(text, row.stop)
            if upto > row.sent:
                row.emit(text[row.sent:upto])
                row.sent = upto
        return False

    def _finish(self, row: Row, text: str, reason: str, cut: bool = False) -> bool:
        if row.emit is not None and len(text) > row.sent:
            row.emit(text[row.sent:])
            row.sent = len(text)
        if row.logprobs is not None:
            row.scores = self._token_scores(row, len(text) if cut else None)
        if row.echo:
            row.prompt_text = self.tok.decode(row.ids, skip_special_tokens=True)
        row.done(text, reason, len(row.out))
        return True

    def _token_scores(self, row: Row, cut: int | None) -> list[TokenScore]:
        """``row.scores`` as :class:`TokenScore`; after a stop string, only the tokens starting before it."""
        out, start = [], 0
        for j, (token, logprob, top) in enumerate(row.scores):
            if cut is not None and start >= cut:
                break
            out.append(self._score(token, logprob, top, start))
            start = len(self.tok.decode(row.out[: j + 1], skip_special_tokens=True))
        return out
