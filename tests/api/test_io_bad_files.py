"""Broken adapter files and bad adapter names: one clear error, the model exactly as before.

Covers issue 10: a bad `adapter=` name used to raise KeyError after wrapping layers (and an
absolute path escaped the directory); `lorafit info` gave tracebacks on broken files and reported
the config's r without looking at the tensors; `save_adapter` into a file gave a traceback; a
killed save's temporary files stayed forever.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from tests.helpers import Tiny

import lorafit
from lorafit.tree import adapter_configs
from lorafit.cli import main
from lorafit.io import read_adapter_tensors

WEIGHTS = "adapter_model.safetensors"


def snapshot(model):
    """Everything a failed load must leave alone: tensors, module types, flags, adapter state."""
    sd = model.state_dict()
    return {
        "state": {k: v.detach().clone() for k, v in sd.items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "active": lorafit.active_adapters(model),
        "names": lorafit.adapter_names(model),
        "configs": adapter_configs(model),
    }


def assert_same(a, b):
    assert a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    for key in ("types", "grad", "active", "names", "configs"):
        assert a[key] == b[key], key


@pytest.fixture
def saved(tmp_path):
    model = Tiny()
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["lin", "emb"], init=False, modules_to_save=["cls"]))
    return lorafit.save_adapter(model, tmp_path / "a")


def _host():
    """A model that already has an adapter on `lin`: a failed load must not touch its wrapper either."""
    model = Tiny()
    lorafit.inject(model, lorafit.LoraConfig(r=3, target_modules=["lin"], init=False), adapter="first")
    return model


def _edit_config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _drop_tensor(d, key):
    from safetensors.torch import load_file, save_file
    tensors = load_file(d / WEIGHTS)
    del tensors["base_model.model." + key]
    save_file(tensors, d / WEIGHTS, metadata={"format": "pt"})


FAILURES = {
    # kind: (edit the saved directory, adapter name, expected message)
    "dot in name": (None, "x.y", "adapter name 'x.y' contains '.'"),
    "parent dir": (None, "../evil", r"adapter name '../evil' contains"),
    "empty name": (None, "", "adapter name must be a non-empty string"),
    "slash": (None, "a/b", "adapter name 'a/b' contains '/'"),
    "ModuleDict attribute": (None, "keys", "attribute of nn.ModuleDict"),
    "name present": (None, "first", "already has an adapter 'first'"),
    "wrong shape": (lambda d: _edit_config(d, r=4), "other", r"has shape \(2, (8|20)\) but the model needs"),
    "missing tensor": (lambda d: _drop_tensor(d, "lin.lora_B.weight"), "other", "only one of lora_A / lora_B"),
    "missing saved tensor": (lambda d: _drop_tensor(d, "cls.bias"), "other", "modules_to_save 'cls' does not fit"),
    "bad config": (lambda d: _edit_config(d, lora_dropout=2.0), "other", "dropout"),
    "truncated": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:-3]), "other",
                  "not a valid safetensors file"),
}


@pytest.mark.parametrize("kind", list(FAILURES))
def test_failed_load_leaves_model_exactly_as_before(saved, kind):
    edit, name, match = FAILURES[kind]
    if edit:
        edit(saved)
    model = _host()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lorafit.load_adapter(model, saved, adapter=name)
    assert_same(before, snapshot(model))


def test_load_refuses_a_name_the_model_has_even_on_other_layers(tmp_path):
    """Two adapters named "default" on disjoint layers would silently become one."""
    other = Tiny()
    lorafit.inject(other, lorafit.LoraConfig(r=2, target_modules=["lin"], init=False))
    d = lorafit.save_adapter(other, tmp_path / "lin_only")
    model = Tiny()
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["cls"], init=False))
    before = snapshot(model)
    with pytest.raises(ValueError, match="the model already has an adapter 'default'"):
        lorafit.load_adapter(model, d)
    assert_same(before, snapshot(model))


def test_absolute_path_as_adapter_name_reads_nothing_outside(tmp_path, saved):
    """`adapter=` may name a sub-directory of `directory`; an absolute path must not escape it."""
    given = tmp_path / "given"
    given.mkdir()
    model = Tiny()
    before = snapshot(model)
    with pytest.raises(ValueError, match="contains '/'"):
        lorafit.load_adapter(model, given, adapter=str(saved.resolve()))
    with pytest.raises(ValueError, match="contains '/'"):
        lorafit.read_adapter_config(given, adapter=str(saved.resolve()))
    assert_same(before, snapshot(model))
    # the legitimate use of the name: <directory>/<adapter>/ still works
    shutil.copytree(saved, given / "mine")
    with pytest.warns(UserWarning, match="fingerprint"):  # saved from another Tiny's weights
        lorafit.load_adapter(model, given, adapter="mine")
    assert lorafit.adapter_names(model) == ["mine"]


@pytest.mark.parametrize("name", ["x.y", "", "a/b", "training", None])
def test_inject_and_set_adapter_refuse_bad_names_without_touching_the_model(name):
    model = _host()
    before = snapshot(model)
    with pytest.raises(ValueError, match="adapter name"):
        lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["lin", "emb"]), adapter=name)
    with pytest.raises(ValueError, match="adapter name"):
        lorafit.set_adapter(model, ["first", name])
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("name", ["a/b", "keys", "first"])
def test_combine_adapters_refuses_bad_or_taken_new_name(name):
    model = _host()
    before = snapshot(model)
    with pytest.raises(ValueError, match="combine_adapters: new_name"):
        lorafit.combine_adapters(model, ["first"], [1.0], new_name=name)
    assert_same(before, snapshot(model))


# ------------------------------------------------------------------ broken safetensors files
def _broken(saved, how):
    data = (saved / WEIGHTS).read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    return {
        "zero-byte": b"",
        "4 bytes": data[:4],
        "cut in the header": data[: 8 + header // 2],
        "cut in the data": data[:-5],
        "huge header length": struct.pack("<Q", 2**62) + data[8:],
        "not safetensors": b"PK\x03\x04 a zip file, not safetensors",
    }[how]


BROKEN = ["zero-byte", "4 bytes", "cut in the header", "cut in the data", "huge header length", "not safetensors"]


@pytest.mark.parametrize("how", BROKEN)
def test_broken_weights_file_one_line_everywhere(saved, how, capsys):
    path = saved / WEIGHTS
    path.write_bytes(_broken(saved, how))
    want = f"{path}: not a valid safetensors file"
    with pytest.raises(ValueError, match="not a valid safetensors file") as err:
        read_adapter_tensors(saved)
    assert str(err.value).startswith(want) and "\n" not in str(err.value)
    model = Tiny()
    before = snapshot(model)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        lorafit.load_adapter(model, saved)
    assert_same(before, snapshot(model))
    assert main(["info", str(saved)]) == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith(f"lorafit: error: {want}") and err_text.count("\n") == 1


def test_huge_declared_header_is_refused_by_its_size(saved):
    """The declared header length is compared with the file size before any parser reads it."""
    path = saved / WEIGHTS
    size = path.stat().st_size
    path.write_bytes(_broken(saved, "huge header length"))
    with pytest.raises(ValueError, match=rf"declares a {2**62}-byte header but the file has {size} bytes"):
        read_adapter_tensors(saved)


@pytest.mark.parametrize("file, text, match", [
    ("labels.json", "[\"neg\", ", "labels.json: not valid JSON"),
    ("labels.json", '{"0": "neg"}', "labels.json: expected a JSON list of labels, got dict"),
    ("adapter_config.json", "[1, 2]", "adapter_config.json: expected a JSON object, got list"),
    ("adapter_config.json", "\xff\xfe", "adapter_config.json: not valid JSON"),
    ("lorafit_job.json", "[]", "lorafit_job.json: expected a JSON object, got list"),
])
def test_info_bad_json_beside_the_adapter(saved, file, text, match, capsys):
    (saved / file).write_text(text, encoding="latin-1")
    assert main(["info", str(saved)]) == 2
    err = capsys.readouterr().err
    assert match in err and err.startswith(f"lorafit: error: {saved / file}") and err.count("\n") == 1


# ------------------------------------------------------------------ info checks the tensors
def _info(d, capsys):
    capsys.readouterr()
    code = main(["info", str(d), "--json"])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else out.err)


def test_info_rank_must_match_the_tensors(saved, capsys):
    code, info = _info(saved, capsys)
    assert code == 0 and info["rank"] == 2
    _edit_config(saved, r=4)
    code, err = _info(saved, capsys)
    assert code == 2
    assert err.startswith(f"lorafit: error: {saved / WEIGHTS}: key 'base_model.model.")
    assert "which does not fit adapter_config.json's r=4" in err and err.count("\n") == 1


def test_info_rank_pattern_is_checked_per_layer(tmp_path, capsys):
    model = Tiny()
    lorafit.inject(model, lorafit.LoraConfig(r=2, rank_pattern={"lin": 4}, target_modules=["lin", "emb"], init=False))
    d = lorafit.save_adapter(model, tmp_path / "p")
    code, info = _info(d, capsys)
    assert code == 0 and info["rank_pattern"] == {"lin": 4}
    _edit_config(d, rank_pattern={"lin": 3})
    code, err = _info(d, capsys)
    assert code == 2 and "key 'base_model.model.lin.lora_" in err and "rank_pattern gives r=3 for 'lin'" in err
    _edit_config(d, rank_pattern={})  # emb still fits r=2, lin (rank 4) does not
    code, err = _info(d, capsys)
    assert code == 2 and "key 'base_model.model.lin.lora_" in err and "r=2" in err


def test_info_lone_lora_A_is_an_error(saved, capsys):
    _drop_tensor(saved, "lin.lora_B.weight")
    code, err = _info(saved, capsys)
    assert code == 2 and "layer 'lin' has lora_A but not its lora_B" in err


def test_info_accepts_grouped_conv_mha_and_dora(tmp_path, capsys):
    """Layouts where B's second dim is not r (grouped conv), out_proj keys (MHA), DoRA magnitudes."""
    net = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.LazyLinear(3))
    net(torch.zeros(1, 4, 5, 5))
    lorafit.inject(net, lorafit.LoraConfig(r=4, target_modules=["0"], init=False))
    with pytest.warns(UserWarning, match="group-respecting"):
        conv = lorafit.save_adapter(net, tmp_path / "conv")
    mha = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    lorafit.inject(mha, lorafit.LoraConfig(r=2, rank_pattern={"self_attn": 4}, target_modules=["self_attn"]))
    attn = lorafit.save_adapter(mha, tmp_path / "mha")
    lin = Tiny()
    lorafit.inject(lin, lorafit.LoraConfig(r=2, target_modules=["lin"], use_dora=True))
    dora = lorafit.save_adapter(lin, tmp_path / "dora")
    from safetensors.torch import load_file
    for d in (conv, attn, dora):
        code, info = _info(d, capsys)
        assert code == 0, info
        tensors = load_file(d / WEIGHTS)
        lora = sum(t.numel() for k, t in tensors.items() if ".lora_" in k)
        assert info["lora_params"] == lora and info["params"] == sum(t.numel() for t in tensors.values())


# ------------------------------------------------------------------ save_adapter
@pytest.mark.parametrize("sub", ["", "deeper"])
def test_save_into_a_file_path_writes_nothing(tmp_path, sub):
    model = Tiny()
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["lin"]))
    target = tmp_path / "taken"
    target.write_text("keep me")
    with pytest.raises(ValueError, match=f"{target}: exists and is not a directory"):
        lorafit.save_adapter(model, target / sub if sub else target)
    assert target.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["taken"]


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_stale_temp_files_of_a_killed_save_are_cleaned_by_the_next_save(tmp_path):
    """A save killed (SIGKILL) mid-write leaves `.adapter_model.safetensors.XXXXXXXX.tmp`."""
    d = tmp_path / "ad"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r})  # the repo root: tests is a package
        import safetensors.torch, lorafit
        from tests.helpers import Tiny
        real = safetensors.torch.save_file
        def save_and_die(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            os.kill(os.getpid(), signal.SIGKILL)  # killed before the rename
        safetensors.torch.save_file = save_and_die
        m = Tiny()
        lorafit.inject(m, lorafit.LoraConfig(r=2, target_modules=["lin"]))
        lorafit.save_adapter(m, {str(d)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    left = [p.name for p in d.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".{WEIGHTS}.") and left[0].endswith(".tmp")
    others = [".adapter_config.json.abc_1234.tmp", f".{WEIGHTS}.tmp", ".other.abcd1234.tmp", "notes.tmp",
              f".{WEIGHTS}.abcd1234.tmp.keep"]
    for name in others[1:]:
        (d / name).write_text("not ours")
    (d / others[0]).write_text("ours: a killed config write")
    model = Tiny()
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["lin"]))
    lorafit.save_adapter(model, d)
    assert sorted(p.name for p in d.iterdir()) == sorted(others[1:] + ["adapter_config.json", WEIGHTS, "README.md"])
