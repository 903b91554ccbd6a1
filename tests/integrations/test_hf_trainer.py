"""transformers Trainer / TRL SFTTrainer on a lorafit-injected tiny Llama (CPU, a few steps).

What is pinned: every checkpoint and `save_model` hold the adapter in PEFT's format (no whole-model
weights), the output loads with PeftModel, AutoPeftModelForCausalLM, lorafit.load_adapter and
transformers' own from_pretrained (its PEFT integration) to the trained model's logits, and a run
resumed from a checkpoint ends with the same adapter as an uninterrupted one.
"""

import shutil

import pytest
import torch

import lorafit
from lorafit.integrations.hf import adapter_trainer
from lorafit.io import adapter_state

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def injected(base_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    return lorafit.inject(model, lorafit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))


def rows(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (n, 12), generator=g)
    return [{"input_ids": r, "labels": r} for r in ids]


def args(out, **kw):
    kw = {"max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
          "report_to": [], "use_cpu": True, "logging_steps": 50, "seed": 7, "disable_tqdm": True, **kw}
    return transformers.TrainingArguments(output_dir=str(out), **kw)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """One 4-step Trainer run with checkpoints at steps 2 and 4, then save_model."""
    out = tmp_path_factory.mktemp("trainer")
    model = injected(tiny_llama)
    trainer = transformers.Trainer(model=model, args=args(out / "run"), train_dataset=rows())
    trainer.train()
    trainer.save_model(str(out / "final"))
    return model, out


def test_checkpoints_and_save_model_are_peft_adapters(trained, tmp_path):
    model, out = trained
    lorafit.save_adapter(model, tmp_path / "direct")
    size = (tmp_path / "direct" / "adapter_model.safetensors").stat().st_size
    for ckpt in (out / "run" / "checkpoint-2", out / "run" / "checkpoint-4"):
        assert {p.name for p in ckpt.iterdir()} == ADAPTER_FILES | TRAINER_FILES
        assert (ckpt / "adapter_model.safetensors").stat().st_size == size
    assert {p.name for p in (out / "final").iterdir()} == ADAPTER_FILES | {"training_args.bin"}
    cfg = lorafit.read_adapter_config(out / "final")
    assert cfg.task_type == "CAUSAL_LM" and cfg.r == 4


def test_the_output_loads_with_peft_autopeft_lorafit_and_from_pretrained(trained, tiny_llama):
    model, out = trained
    ids = torch.randint(3, 60, (2, 9))
    want = logits(model, ids)
    final = str(out / "final")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    torch.testing.assert_close(logits(lorafit.load_adapter(fresh, final), ids), want)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(base, final), ids), want)
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(final)
    assert isinstance(auto, peft.PeftModelForCausalLM)
    torch.testing.assert_close(logits(auto, ids), want)
    # the silently-wrong case of the issue: transformers' from_pretrained on the checkpoint
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(out / "run" / "checkpoint-4"))
    torch.testing.assert_close(logits(plain, ids), want)


def test_resume_from_checkpoint_equals_an_uninterrupted_run(trained, tiny_llama, tmp_path):
    model, out = trained
    shutil.copytree(out / "run" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")  # a run stopped at step 2
    resumed = injected(tiny_llama)
    trainer = adapter_trainer(transformers.Trainer(model=resumed, args=args(tmp_path / "resumed"),
                                                   train_dataset=rows()))
    trainer.train(resume_from_checkpoint=True)  # the last checkpoint in output_dir, as the README shows
    assert trainer.state.global_step == 4
    want, got = adapter_state(model), adapter_state(resumed)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)


def test_resume_without_adapter_trainer_is_transformers_refusal_not_a_silent_restart(trained, tiny_llama, tmp_path):
    _, out = trained
    trainer = transformers.Trainer(model=injected(tiny_llama), args=args(tmp_path / "r"), train_dataset=rows())
    with pytest.raises(ValueError, match="checkpoint"):
        trainer.train(resume_from_checkpoint=str(out / "run" / "checkpoint-2"))


def test_load_best_model_at_end_reads_the_best_adapter(tiny_llama, tmp_path):
    model = injected(tiny_llama)
    calls = []

    def first_is_best(_):  # a metric that makes checkpoint-2 the best, so the end state must be read back
        calls.append(1)
        return {"score": 1.0 if len(calls) == 1 else 0.0}

    trainer = adapter_trainer(transformers.Trainer(
        model=model, args=args(tmp_path / "run", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                               metric_for_best_model="score", greater_is_better=True),
        train_dataset=rows(), eval_dataset=rows(4, seed=1), compute_metrics=first_is_best))

    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2"), best
    ids = torch.randint(3, 60, (2, 9))
    got = logits(model, ids)
    for step, same in ((2, True), (4, False)):
        fresh = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
        lorafit.load_adapter(fresh, tmp_path / "run" / f"checkpoint-{step}")
        assert torch.allclose(got, logits(fresh, ids)) is same, step


def test_sft_trainer_saves_adapters_and_resumes(tiny_llama, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    data = datasets.Dataset.from_list([{"text": f"ticket {i}: the parcel arrived late and damaged"} for i in range(12)])

    def run(out, resume=None):
        model = injected(tiny_llama)
        cfg = trl.SFTConfig(output_dir=str(out), max_steps=2, save_steps=1, per_device_train_batch_size=4,
                            learning_rate=1e-2, report_to=[], use_cpu=True, seed=7, max_length=32,
                            logging_steps=50, disable_tqdm=True, bf16=False)  # TRL's default bf16 autocast
        # stays wrapped around model.forward after training: fp32 keeps the logits comparable exactly
        trainer = adapter_trainer(trl.SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok))
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoint-1"
    names = {p.name for p in ckpt.iterdir()}
    assert ADAPTER_FILES | TRAINER_FILES <= names and not {"model.safetensors", "pytorch_model.bin"} & names
    resumed = run(tmp_path / "b", resume=str(ckpt))
    want, got = adapter_state(straight), adapter_state(resumed)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    ids = torch.randint(3, 60, (2, 9))
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "a" / "checkpoint-2"))
    torch.testing.assert_close(logits(loaded, ids), logits(straight, ids))


def test_trainer_takes_an_injected_bitsandbytes_4bit_model(tmp_path):
    """QLoRA as users have it: transformers refuses a quantized model unless it says adapters are attached."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (the bnb extra)")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.float32)

    def load():
        try:
            return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant,
                                                                     device_map="cpu")
        except Exception as exc:  # noqa: BLE001 - the skip says which backend failed and why
            pytest.skip(f"bitsandbytes {bnb.__version__} cannot load a 4-bit model on the CPU: {exc}")

    model = lorafit.inject(load(), lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer = transformers.Trainer(model=model, args=args(tmp_path / "run", max_steps=2), train_dataset=rows(8))
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert {p.name for p in ckpt.iterdir()} == ADAPTER_FILES | TRAINER_FILES
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    ids = torch.randint(3, 60, (2, 9))
    again = lorafit.load_adapter(load(), ckpt)
    torch.testing.assert_close(logits(again, ids), logits(model, ids))
    for name in lorafit.adapter_names(model):
        lorafit.delete_adapter(model, name)
    with pytest.raises(ValueError, match="no lorafit adapter left"):
        model.save_pretrained(tmp_path / "empty")
