"""PEFT-shaped files and config: task_type, base name, model card, PEFT config objects, trainable-parameter
line, resized vocabularies (both directions between lorafit and PEFT)."""

import copy
import json
import warnings

import pytest
import torch
from tests.helpers import Tiny, state, tiny_llama

import lorafit
from lorafit.config import TASK_TYPES
from lorafit.model_card import CARD_MARK

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _bert(cls_name):
    from transformers import BertConfig
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32)
    return getattr(transformers, cls_name)(cfg)


@pytest.mark.parametrize("cls_name,task", [
    ("BertForSequenceClassification", "SEQ_CLS"), ("BertForTokenClassification", "TOKEN_CLS"),
    ("BertForQuestionAnswering", "QUESTION_ANS"), ("BertModel", "FEATURE_EXTRACTION"),
])
def test_task_type_is_inferred_from_the_model_class(cls_name, task):
    assert lorafit.infer_task_type(_bert(cls_name)) == task


def test_task_type_of_llama_t5_and_a_plain_module():
    assert lorafit.infer_task_type(tiny_llama()) == "CAUSAL_LM"
    from transformers import T5Config, T5ForConditionalGeneration
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    assert lorafit.infer_task_type(t5) == "SEQ_2_SEQ_LM"
    assert lorafit.infer_task_type(Tiny()) is None
    from transformers import GPT2Config, GPT2DoubleHeadsModel, GPT2LMHeadModel
    cfg = GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=16, n_positions=8)
    assert lorafit.infer_task_type(GPT2LMHeadModel(cfg)) == "CAUSAL_LM"
    assert lorafit.infer_task_type(GPT2DoubleHeadsModel(cfg)) is None  # two heads: no PEFT task type fits


def test_written_task_type_inferred_or_given_and_autopeft_uses_it(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")  # a base AutoPeft can find
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init=False))
    lorafit.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == str(tmp_path / "base")
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a")).eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, model.eval()(ids).logits)
    given = tiny_llama()
    task = peft.TaskType.FEATURE_EXTRACTION  # PEFT's enum is accepted
    lorafit.inject(given, lorafit.LoraConfig(r=2, target_modules=["q_proj"], task_type=task))
    lorafit.save_adapter(given, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"


def test_lora_config_task_type_is_validated_and_not_compared():
    assert lorafit.LoraConfig(task_type="SEQ_CLS") == lorafit.LoraConfig()
    assert set(TASK_TYPES) == {t.value for t in peft.TaskType}
    with pytest.raises(ValueError, match="task_type"):
        lorafit.LoraConfig(task_type="CAUSAL")


def test_peft_config_object_and_in_memory_dict_are_accepted():
    pc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                         task_type="CAUSAL_LM")
    want = lorafit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], fan_in_fan_out=False)
    for got in (lorafit.LoraConfig.from_peft_dict(pc), lorafit.LoraConfig.from_peft_dict(pc.to_dict())):
        assert got == want and got.task_type == "CAUSAL_LM" and set(got.target_modules) == {"q_proj", "v_proj"}
    a, b = tiny_llama(), tiny_llama()
    b.load_state_dict(a.state_dict())
    torch.manual_seed(1)
    lorafit.inject(a, pc)  # a peft.LoraConfig straight into inject
    torch.manual_seed(1)
    lorafit.inject(b, want)
    assert {k for k in a.state_dict() if "lora" in k} == {k for k in b.state_dict() if "lora" in k}
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    with pytest.raises(TypeError, match="peft.LoraConfig"):
        lorafit.inject(tiny_llama(), "r=8")
    with pytest.raises(ValueError, match="lora_bias"):
        lorafit.inject(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))


def test_print_trainable_parameters_matches_peft(capsys):
    model = tiny_llama()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pm.print_trainable_parameters()
    want = capsys.readouterr().out
    lorafit.inject(model, lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lorafit.print_trainable_parameters(model)
    assert capsys.readouterr().out == want and want.startswith("trainable params: ")


def test_model_card_written_kept_when_the_users_and_rewritten_when_ours(tmp_path):
    model = tiny_llama()
    lorafit.inject(model, lorafit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    d = lorafit.save_adapter(model, tmp_path / "a", base_model_name_or_path="org/tiny", metrics={"eval_loss": 1.25})
    card = (d / "README.md").read_text()
    assert card.startswith("---\nbase_model: org/tiny\nlibrary_name: peft\n") and CARD_MARK in card
    for text in ("rank / alpha | 4 / 8", "`q_proj`, `v_proj` (4 layers)", "| eval_loss | 1.25 |",
                 "lorafit.load_adapter(model", "PeftModel.from_pretrained(", "AutoPeftModelForCausalLM",
                 f"{sum(v.numel() for k, v in model.state_dict().items() if 'adapters' in k):,d} ("):
        assert text in card, text
    lorafit.save_adapter(model, d, base_model_name_or_path="org/tiny")  # ours: rewritten (no metrics now)
    assert "eval_loss" not in (d / "README.md").read_text()
    (d / "README.md").write_text("my own notes\n")
    lorafit.save_adapter(model, d)
    assert (d / "README.md").read_text() == "my own notes\n"
    assert not list(d.glob(".*.tmp"))


def test_base_name_is_kept_through_a_load_and_save(tmp_path):
    model = Tiny()
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["lin"]))
    lorafit.save_adapter(model, tmp_path / "a", base_model_name_or_path="org/base")
    base = copy.deepcopy(model)
    lorafit.unload(base)
    again = lorafit.load_adapter(base, tmp_path / "a")
    lorafit.save_adapter(again, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/base"


# ------------------------------------------------------------------ resized vocabularies
@pytest.fixture
def resized(tmp_path):
    """A saved base (vocab 64), a model loaded from it and resized to 70 with LoRA trained-looking (random B)."""
    tiny_llama().save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model.resize_token_embeddings(70)
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init=False))
    return model.eval(), tmp_path


def fresh_base(tmp_path, vocab=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    if vocab:
        torch.manual_seed(123)  # new rows drawn differently from the trained model's
        model.resize_token_embeddings(vocab)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_resized_vocab_saves_embeddings_under_peft_keys_and_reloads_exactly(resized):
    model, tmp = resized
    with pytest.warns(UserWarning, match="70 rows, the base has 64"):
        lorafit.save_adapter(model, tmp / "a")
    tensors, _ = lorafit.io.read_adapter_tensors(tmp / "a")
    assert tensors["model.embed_tokens.weight"].shape == (70, 32) and tensors["lm_head.weight"].shape == (70, 32)
    assert "resized vocabulary" in (tmp / "a" / "README.md").read_text()
    ids = torch.tensor([[1, 65, 69, 3, 66]])  # new tokens in the input and in the output rows
    want = logits(model, ids)
    ours = lorafit.load_adapter(fresh_base(tmp, 70), tmp / "a")
    assert torch.equal(logits(ours, ids), want)
    theirs = peft.PeftModel.from_pretrained(fresh_base(tmp, 70), str(tmp / "a")).eval()
    torch.testing.assert_close(logits(theirs, ids), want)


def test_resized_vocab_onto_a_base_of_another_size_is_one_clear_error(resized):
    model, tmp = resized
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorafit.save_adapter(model, tmp / "a")
    base = fresh_base(tmp)
    before = state(base)
    with pytest.raises(ValueError, match=r"vocabulary of 70 rows \(model.embed_tokens.weight\) but the model's has 64"):
        lorafit.load_adapter(base, tmp / "a")
    assert state(base).keys() == before.keys() and all(torch.equal(state(base)[k], v) for k, v in before.items())
    assert not lorafit.adapter_names(base)


def test_lorafit_loads_peft_saved_resized_embeddings(resized):
    _, tmp = resized
    base = fresh_base(tmp, 70)
    pm = peft.get_peft_model(copy.deepcopy(base),
                             peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():
        pm.base_model.model.model.embed_tokens.weight[64:] += 1.0  # trained rows PEFT must carry
    with pytest.warns(UserWarning, match="resized"):
        pm.save_pretrained(str(tmp / "p"))
    theirs, _ = lorafit.io.read_adapter_tensors(tmp / "p")
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(theirs)  # the keys lorafit writes too
    ids = torch.tensor([[1, 65, 69, 3]])
    ours = lorafit.load_adapter(fresh_base(tmp, 70), tmp / "p")
    torch.testing.assert_close(logits(ours, ids), logits(pm.eval(), ids))
    with pytest.raises(ValueError, match="70 rows"):
        lorafit.load_adapter(fresh_base(tmp), tmp / "p")


def test_unresized_vocab_saves_no_embeddings(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["q_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorafit.save_adapter(model, tmp_path / "a")
    tensors, _ = lorafit.io.read_adapter_tensors(tmp_path / "a")
    assert all("lora_" in k for k in tensors)
    lorafit.save_adapter(model, tmp_path / "b", save_embedding_layers=True)
    tensors, _ = lorafit.io.read_adapter_tensors(tmp_path / "b")
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(tensors)
    plain = Tiny()  # no get_input_embeddings: nothing to save, and it says so (as PEFT does)
    lorafit.inject(plain, lorafit.LoraConfig(r=2, target_modules=["lin"]))
    with pytest.warns(UserWarning, match="names no embedding layer"):
        lorafit.save_adapter(plain, tmp_path / "c", save_embedding_layers=True)


# ------------------------------------------------------------------ model.save_pretrained
def test_save_pretrained_of_an_injected_model_writes_adapters_and_after_merge_the_whole_model(tmp_path):
    model = tiny_llama()
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init=False))
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["k_proj"], init=False), adapter="other")
    model.save_pretrained(tmp_path / "p")
    assert {p.name for p in (tmp_path / "p").iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                            "README.md", "other"}
    assert (tmp_path / "p" / "other" / "adapter_config.json").is_file()
    ids = torch.randint(0, 64, (2, 6))
    base = lorafit.unload(copy.deepcopy(model))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p")).eval()
    torch.testing.assert_close(logits(loaded, ids), logits(model.eval(), ids))
    copied = copy.deepcopy(model)  # a copy saves its own adapter, not the original's
    with torch.no_grad():
        copied.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.add_(1.0)
    copied.save_pretrained(tmp_path / "c")
    again = lorafit.load_adapter(copy.deepcopy(base), tmp_path / "c")
    torch.testing.assert_close(logits(again, ids), logits(copied.eval(), ids))
    assert not torch.allclose(logits(again, ids), logits(model, ids))
    model.save_pretrained(tmp_path / "none", is_main_process=False)
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match="state_dict"):
        model.save_pretrained(tmp_path / "sd", state_dict=model.state_dict())
    merged = lorafit.merge_and_unload(model)
    assert "save_pretrained" not in vars(merged) and not merged._hf_peft_config_loaded
    merged.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file() and not (tmp_path / "m" / "adapter_config.json").exists()
    whole = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(logits(whole, ids), logits(merged, ids))


def test_reload_adapter_copies_values_in_place_and_refuses_a_file_that_does_not_fit(tmp_path):
    model = Tiny()
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["lin"], init=False))
    lorafit.save_adapter(model, tmp_path / "a")
    param = model.lin.adapters["default"].lora_B
    saved = param.detach().clone()
    with torch.no_grad():
        param.zero_()
    assert lorafit.reload_adapter(model, tmp_path / "a") is model
    assert model.lin.adapters["default"].lora_B is param and torch.equal(param, saved)  # same object, new values
    other = Tiny()
    lorafit.inject(other, lorafit.LoraConfig(r=3, target_modules=["lin"]))
    lorafit.save_adapter(other, tmp_path / "r3")
    before = state(model)
    with pytest.raises(ValueError, match=r"lin.lora_A.weight' has shape \(3, 8\) but the model needs \(2, 8\)"):
        lorafit.reload_adapter(model, tmp_path / "r3")
    lorafit.inject(other, lorafit.LoraConfig(r=3, target_modules=["cls"]), adapter="b")
    lorafit.save_adapter(other, tmp_path / "b", adapter="b")
    with pytest.raises(ValueError, match="the file lacks 'base_model.model.lin.lora_A.weight'"):
        lorafit.reload_adapter(model, tmp_path / "b")
    assert all(torch.equal(state(model)[k], v) for k, v in before.items())


def test_reload_adapter_restores_dora_magnitudes_and_saved_modules(tmp_path):
    model = Tiny()
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["lin"], init=False, use_dora=True,
                                             modules_to_save=["cls"]))
    lorafit.save_adapter(model, tmp_path / "a")
    want = state(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    assert not all(torch.equal(state(model)[k], v) for k, v in want.items())
    lorafit.reload_adapter(model, tmp_path / "a")
    assert all(torch.equal(state(model)[k], v) for k, v in want.items())


def test_an_injected_transformers_model_pickles_and_keeps_saving_adapters(tmp_path):
    import pickle
    model = tiny_llama()
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["q_proj"], init=False))
    again = pickle.loads(pickle.dumps(model))
    assert again.save_pretrained.model is again
    again.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "p" / "model.safetensors").exists()


def test_resized_vocab_of_a_hub_base_is_found_through_the_hub_cache(resized, monkeypatch):
    """A base loaded by Hub id: resize_token_embeddings updated model.config, so the old size comes from
    the cached config.json (as PEFT reads it from the Hub); with no cached copy nothing can tell."""
    model, tmp = resized
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp / "hub"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorafit.save_adapter(model, tmp / "uncached", base_model_name_or_path="org/tiny")
    assert all("lora_" in k for k in lorafit.io.read_adapter_tensors(tmp / "uncached")[0])
    snap = tmp / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text((tmp / "base" / "config.json").read_text())
    (tmp / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp / "hub" / "models--org--tiny" / "refs" / "main").write_text("abc123")
    with pytest.warns(UserWarning, match="70 rows, the base has 64"):
        lorafit.save_adapter(model, tmp / "cached", base_model_name_or_path="org/tiny")
    assert lorafit.io.read_adapter_tensors(tmp / "cached")[0]["model.embed_tokens.weight"].shape == (70, 32)
