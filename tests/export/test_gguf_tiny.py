"""`lorafit export --format gguf / gguf-lora` on tiny random Llamas: what transformers and llama.cpp read.

Every exported file is checked by readers that lorafit does not implement: transformers'
``from_pretrained(dir, gguf_file=...)`` (which undoes llama.cpp's Q/K row order itself) and the
``gguf`` package's ``GGUFReader``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # the dev extra installs it: a skip here means a broken venv

import lorafit  # noqa: E402
from lorafit.export.gguf_load import PROMPTS, logits_of, prompt_ids  # noqa: E402
from lorafit.export.gguf_write import llama_permute  # noqa: E402
from tests.export.gguf_helpers import adapter_for, make_adapter, make_llama_dir  # noqa: E402


def cli(argv, capsys):
    import lorafit.cli as cli_mod

    capsys.readouterr()  # what building the fixtures printed is not the command's output
    code = cli_mod.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def merged_reference(base_dir, adapter_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = lorafit.merge_and_unload(lorafit.load_adapter(base, adapter_dir)).eval()
    return merged, AutoTokenizer.from_pretrained(base_dir)


def read_back(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-tiny")
    base = make_llama_dir(root / "base")
    return base, adapter_for(base, root / "run" / "adapter")


def test_llama_permute_is_what_transformers_undoes():
    """Our Q/K reorder is the inverse of transformers' GGUF reader's, for Q (4 heads) and K (2 KV heads)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for name, rows, heads in (("blk.0.attn_q.weight", 64, 4), ("blk.0.attn_k.weight", 32, 2)):
        w = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
        mine = llama_permute(w, heads)
        assert not np.array_equal(mine, w)
        assert np.array_equal(proc.process(mine, name).weights, w)


def test_f16_export_reads_back_as_the_merged_model(llama, tmp_path, capsys):
    base, adapter = llama
    out = tmp_path / "model.gguf"
    code, stdout, err = cli(["export", "--adapter", str(adapter), "--format", "gguf", "--out", str(out),
                             "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    assert "read back by transformers vs merged PyTorch" in stdout and "OK" in stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tensors"]["counts"] == {"F16": 16, "F32": 5} and not report["tensors"]["tied"]
    assert report["tokenizer_same_ids"] and report["chat_template_kept"]
    # independently of the report: transformers' reading of the file computes the merged model
    merged, tok = merged_reference(base, adapter)
    back, back_tok = read_back(out)
    ids = prompt_ids(tok)
    ref, got = logits_of(merged, ids), logits_of(back, ids)
    peak = max(float(r.abs().max()) for r in ref)
    assert peak > 3  # logits large enough that a wrong tensor shows
    assert max(float((r - g).abs().max()) for r, g in zip(ref, got)) <= 1e-2 * peak
    # sharper: the file holds exactly the merged weights rounded to f16 (norms f32)
    with torch.no_grad():
        for p in merged.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    rounded = logits_of(merged, ids)
    assert max(float((r - g).abs().max()) for r, g in zip(rounded, got)) <= 1e-5 * peak
    assert prompt_ids(back_tok) == ids
    # and the LoRA is in it: the base alone is far from the merged model
    from transformers import AutoModelForCausalLM

    plain = logits_of(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(), ids)
    assert max(float((r - p).abs().max()) for r, p in zip(ref, plain)) > 0.1 * peak
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt2"
    assert [reader.fields[f"tokenizer.ggml.{k}_token_id"].contents() for k in ("bos", "eos", "padding")] == [1, 2, 0]
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False  # this tokenizer adds no BOS
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_q.weight",
            "blk.1.ffn_down.weight", "blk.0.attn_norm.weight"} <= names
    assert {t.name: t.tensor_type.name for t in reader.tensors}["blk.0.attn_norm.weight"] == "F32"


def test_q8_q4_from_a_gguf_base_carry_its_metadata(llama, tmp_path, capsys):
    """A GGUF base (here: the tiny model exported once) gives its keys to the export; q8_0 / q4_0 weights
    read back within their block-quantization step (the tiny random model is too chaotic for logits to say more:
    top-1 agreement is measured on SmolLM2)."""
    from lorafit.integrations.gguf import load_model

    base_dir, adapter = llama
    base_gguf = tmp_path / "base" / "tiny.gguf"
    code, _, err = cli(["export", "--adapter", str(adapter), "--format", "gguf", "--out", str(base_gguf)], capsys)
    assert code == 0, err
    run = make_adapter(load_model(base_gguf, dtype=torch.float32), tmp_path / "run2" / "adapter", str(base_gguf),
                       b_std=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    merged = lorafit.merge_and_unload(lorafit.load_adapter(load_model(base_gguf, dtype=torch.float32), run))
    want = merged.state_dict()
    base_reader = gguf.GGUFReader(base_gguf)
    worst = {}
    for quant, step in (("q8_0", 1 / 127), ("q4_0", 1 / 7), ("q4_1", 1 / 7)):
        out, js = tmp_path / f"m-{quant}.gguf", tmp_path / f"{quant}.json"
        code, stdout, err = cli(["export", "--adapter", str(run), "--format", "gguf", "--quant", quant,
                                 "--out", str(out), "--json", str(js)], capsys)
        assert code == 0, err
        report = json.loads(js.read_text())
        assert "carried over from tiny.gguf" in report["metadata"] and "(reported, not enforced)" in stdout
        assert 0 <= report["readback"]["top1_agreement"] <= 1 and "top-1 agreement" in stdout
        got = read_back(out)[0].state_dict()
        errors = {k: float((want[k] - got[k]).abs().max() / want[k].abs().max()) for k in want if want[k].ndim == 2}
        assert max(errors.values()) <= step, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
        worst[quant] = max(errors.values())
        reader = gguf.GGUFReader(out)
        kinds = {t.name: t.tensor_type.name for t in reader.tensors}
        assert kinds["blk.0.attn_q.weight"] == quant.upper() and kinds["blk.0.ffn_norm.weight"] == "F32"
        assert kinds["output.weight"] == "Q8_0"  # q4_0 keeps the output layer at 8 bits; q8_0 is 8 bits anyway
        assert reader.fields["general.file_type"].contents() == {"q8_0": 7, "q4_0": 2, "q4_1": 3}[quant]
        assert "run2" in reader.fields["general.name"].contents()
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "llama.block_count",
                    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
            assert reader.fields[key].contents() == base_reader.fields[key].contents(), key
    assert worst["q8_0"] < worst["q4_0"] / 4  # 8 bits really are finer than 4
    assert report["tensors"]["exceptions"] == ["output.weight: Q8_0 (the output layer, kept at higher precision "
                                               "as llama.cpp does)"]


def test_tied_embeddings_and_rows_that_do_not_fit_blocks(tmp_path, capsys):
    """Tied: no output.weight (transformers reads that as tied). ffn rows of 48 values cannot be Q8_0: F16."""
    base = make_llama_dir(tmp_path / "base", tie=True, intermediate=48)
    adapter = adapter_for(base, tmp_path / "run" / "adapter")
    out, js = tmp_path / "m.gguf", tmp_path / "r.json"
    code, _, err = cli(["export", "--adapter", str(adapter), "--format", "gguf", "--quant", "q8_0", "--out", str(out),
                        "--json", str(js)], capsys)
    assert code == 0, err
    report = json.loads(js.read_text())
    assert report["tensors"]["tied"]
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert "output.weight" not in kinds
    assert kinds["blk.0.ffn_down.weight"] == "F16" and kinds["blk.0.ffn_up.weight"] == "Q8_0"
    assert "blk.0.ffn_down.weight: F16 (rows of 48 values, not a multiple of 32)" in report["tensors"]["exceptions"]
    back, _ = read_back(out)
    assert back.config.tie_word_embeddings
    assert report["readback"]["top1_agreement"] >= 0.9


@pytest.mark.parametrize("extra", [{}, {"use_rslora": True, "rank_pattern": {"v_proj": 2}}])
def test_gguf_lora_layout_as_llama_cpp_reads_it(llama, tmp_path, capsys, extra):
    """Names, ne order, alpha and values of the llama.cpp LoRA file, read with gguf's reader (not ours)."""
    base, _ = llama
    adapter = adapter_for(base, tmp_path / "run" / "adapter", **extra)
    out = tmp_path / "lora.gguf"
    code, stdout, err = cli(["export", "--adapter", str(adapter), "--format", "gguf-lora", "--out", str(out)], capsys)
    assert code == 0, err
    assert "names and shapes as llama.cpp expects" in stdout
    reader = gguf.GGUFReader(out)
    field = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert field["general.architecture"] == "llama" and field["general.type"] == "adapter"
    assert field["adapter.type"] == "lora"
    alpha = field["adapter.lora.alpha"]
    assert alpha == pytest.approx(8 * 2 if extra else 8)  # rsLoRA: alpha x sqrt(r) = 8 x sqrt(4)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 2 * 7  # 2 blocks x 7 linear layers x (a, b)
    from transformers import AutoModelForCausalLM

    model = lorafit.load_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    for blk in range(2):
        for hf, gg, heads in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2), ("v_proj", "attn_v", None)):
            layer = model.model.layers[blk].self_attn.__getattr__(hf)
            ad = layer.adapters["default"]
            out_f, in_f = layer.base_layer.weight.shape
            a, b = tensors[f"blk.{blk}.{gg}.weight.lora_a"], tensors[f"blk.{blk}.{gg}.weight.lora_b"]
            r = ad.r
            assert list(a.shape) == [in_f, r] and list(b.shape) == [r, out_f]  # GGML ne: llama-adapter.cpp's check
            want = layer.delta_weight(ad).detach().numpy()
            if heads:
                want = llama_permute(want, heads)
            got = np.asarray(b.data) @ np.asarray(a.data) * (alpha / r)  # llama.cpp's scale: alpha / r
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if extra:
        assert "folded into their lora_b" in stdout  # v_proj's r=2 scale differs from alpha / r


def test_prompt_set_is_fixed_and_mixed():
    assert len(PROMPTS) == 8 and {k for k, _ in PROMPTS} == {"chat", "text"}
