"""Bad input to `lorafit export --format gguf / gguf-lora`: one line naming what is wrong, exit 2, no file.

And a failed check: a planted export fault (Q/K rows left in transformers' order) is caught by
the read-back, exits 1 and leaves nothing behind - not even an earlier file at --out is touched.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gguf")  # the dev extra installs it: a skip here means a broken venv

from tests.export.gguf_helpers import adapter_for, make_llama_dir  # noqa: E402


def cli(argv, capsys):
    import lorafit.cli as cli_mod

    capsys.readouterr()  # what building the fixtures printed is not the command's output
    code = cli_mod.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def one_line_error(code, err, *needles, status=2):
    assert code == status, err
    assert len(err) == 1 and err[0].startswith("lorafit: error: "), err
    for n in needles:
        assert n in err[0], err[0]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-bad")
    base = make_llama_dir(root / "base")
    return base, adapter_for(base, root / "run" / "adapter")


def export(adapter, out, *extra):
    return ["export", "--adapter", str(adapter), "--out", str(out), *extra]


def test_not_a_causal_lm_adapter(llama, tmp_path, capsys):
    base, _ = llama
    adapter = adapter_for(base, tmp_path / "a", task="text-classification")
    code, err = cli(export(adapter, tmp_path / "m.gguf", "--format", "gguf"), capsys)
    one_line_error(code, err, "lorafit_job.json", "'text-classification'", "causal-lm")


def test_no_base_named(llama, tmp_path, capsys):
    _, adapter = llama
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / f).write_bytes((adapter / f).read_bytes())
    code, err = cli(export(bare, tmp_path / "m.gguf", "--format", "gguf-lora"), capsys)
    one_line_error(code, err, str(bare), "no lorafit_job.json", "--model")


def test_unsupported_architecture(tmp_path, capsys):
    base = make_llama_dir(tmp_path / "gpt2", model_type="gpt2")
    adapter = adapter_for(base, tmp_path / "a", target_modules=["c_attn"])
    code, err = cli(export(adapter, tmp_path / "m.gguf", "--format", "gguf"), capsys)
    one_line_error(code, err, "architecture 'gpt2'", "GPT2LMHeadModel", "supported: llama")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("config, needle", [({"use_dora": True}, "use_dora: DoRA"),
                                            ({"modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head']"),
                                            ({"target_modules": ["embed_tokens", "q_proj"]}, "Embedding")])
def test_gguf_lora_refuses_what_llama_cpp_cannot_hold(llama, tmp_path, capsys, config, needle):
    base, _ = llama
    adapter = adapter_for(base, tmp_path / "a", **config)
    code, err = cli(export(adapter, tmp_path / "l.gguf", "--format", "gguf-lora"), capsys)
    one_line_error(code, err, needle, "--format gguf")
    assert not (tmp_path / "l.gguf").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--format", "onnx", "--quant", "q8_0", "--model", "m.pt"], "--quant applies to --format gguf, not --format onnx"),
    (["--format", "gguf-lora", "--quant", "f16"], "a llama.cpp LoRA is written F32"),
    (["--format", "gguf", "--int8"], "--int8 applies to --format onnx / torchscript"),
    (["--format", "torchscript"], "--model is required for --format torchscript"),
])
def test_flags_that_do_not_fit_the_format(llama, tmp_path, capsys, argv, needle):
    _, adapter = llama
    code, err = cli(export(adapter, tmp_path / "m.out", *argv), capsys)
    one_line_error(code, err, needle)


def test_bad_quant_value_is_a_usage_error(llama, tmp_path, capsys):
    _, adapter = llama
    code, err = cli(export(adapter, tmp_path / "m.gguf", "--format", "gguf", "--quant", "q5_k"), capsys)
    assert code == 2 and "--quant" in err[-1] and "q5_k" in err[-1]


def test_failed_readback_exits_1_and_leaves_nothing(llama, tmp_path, capsys, monkeypatch):
    """Plant the classic fault (no Q/K reorder): transformers' reader then scrambles RoPE; the check must fail."""
    import lorafit.export.gguf_write as gw

    _, adapter = llama
    out = tmp_path / "m.gguf"
    out.write_bytes(b"an earlier export")
    monkeypatch.setattr(gw, "llama_permute", lambda w, n_head: w)
    code, err = cli(export(adapter, out, "--format", "gguf"), capsys)
    one_line_error(code, err, str(out), "differs from the merged model", "nothing written", status=1)
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary left


def test_failed_lora_check_exits_1(llama, tmp_path, capsys, monkeypatch):
    """Plant a fault in the LoRA file (B's rows not reordered for Q/K): the value check must catch it."""
    import lorafit.export.gguf_lora as gl

    _, adapter = llama
    real = gl.llama_permute
    calls = []

    def only_delta(w, n_head):  # reorder the reference delta but not B: what a converter forgetting B would write
        calls.append(w.shape)
        return real(w, n_head) if len(calls) % 2 == 0 else w

    monkeypatch.setattr(gl, "llama_permute", only_delta)
    code, err = cli(export(adapter, tmp_path / "l.gguf", "--format", "gguf-lora", "--json", str(tmp_path / "j")),
                    capsys)
    one_line_error(code, err, "lora_b @ lora_a", "attn_", "nothing written", status=1)
    assert not (tmp_path / "l.gguf").exists() and not (tmp_path / "j").exists()
    assert json.dumps(calls)  # the planted function ran


def test_unreadable_tokenizer_exits_1(llama, tmp_path, capsys, monkeypatch):
    """Plant a vocabulary fault (token strings reversed): transformers cannot rebuild the BPE; one line, exit 1."""
    import lorafit.export.gguf_meta as gm

    _, adapter = llama
    real = gm._vocab
    monkeypatch.setattr(gm, "_vocab", lambda tok, n: ([t[::-1] for t in real(tok, n)[0]], real(tok, n)[1]))
    code, err = cli(export(adapter, tmp_path / "m.gguf", "--format", "gguf"), capsys)
    one_line_error(code, err, "transformers cannot read the written GGUF back", "nothing written", status=1)
    assert list(tmp_path.iterdir()) == []
