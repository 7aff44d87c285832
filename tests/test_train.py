import pytest
import torch

from alignshield.config import LoraSettings, MethodParams, TrainSettings
from alignshield.data import Example
from alignshield.data.collate import tokenize_pair
from alignshield.models.lora import attach_lora
from alignshield.train import CHECKPOINT, Trainer
from conftest import make_model

LORA = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def _data(tokenizer, n=24):
    return [tokenize_pair(tokenizer, Example(f"question {i}", "", "I'm sorry, I cannot help with that."), "alpaca", 64)
            for i in range(n)]


def _trainer(tokenizer, tmp_path, steps, **kw):
    model = attach_lora(make_model(), LORA)
    args = TrainSettings(learning_rate=5e-3, max_steps=steps, batch_size=4, checkpoint_every=2, **kw)
    return Trainer(model, _data(tokenizer), args, MethodParams(), seed=0, workdir=tmp_path,
                   pad_token_id=tokenizer.eos_token_id, progress=False)


def _lora_state(trainer):
    return {k: v.clone() for k, v in trainer.unwrapped_model().named_parameters() if v.requires_grad}


def test_sft_lowers_the_loss_and_trains_only_lora(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, steps=12)
    frozen = {k: v.clone() for k, v in trainer.unwrapped_model().named_parameters() if not v.requires_grad}
    report = trainer.train()
    losses = [h["loss"] for h in trainer.history]
    assert report["steps"] == 12 and losses[-1] < losses[0]
    for k, v in trainer.unwrapped_model().named_parameters():
        if not v.requires_grad:
            assert torch.equal(v, frozen[k])


def test_resume_is_bit_identical(tokenizer, tmp_path):
    full = _trainer(tokenizer, tmp_path / "full", steps=6)
    full.train()

    class Killed(Exception):
        pass

    interrupted = _trainer(tokenizer, tmp_path / "cut", steps=6)
    original = interrupted._save_checkpoint

    def save_then_die():
        original()
        if interrupted.step == 4:
            raise Killed

    interrupted._save_checkpoint = save_then_die
    try:
        interrupted.train()
    except Killed:
        pass
    assert (tmp_path / "cut" / CHECKPOINT).exists()
    resumed = _trainer(tokenizer, tmp_path / "cut", steps=6)
    report = resumed.train()
    assert report["steps_this_session"] == 2
    a, b = _lora_state(full), _lora_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]


def test_epochs_set_the_step_count(tokenizer, tmp_path):
    model = attach_lora(make_model(), LORA)
    args = TrainSettings(epochs=2, max_steps=None, batch_size=4, grad_accum=2)
    trainer = Trainer(model, _data(tokenizer), args, MethodParams(), seed=0, workdir=tmp_path,
                      pad_token_id=0, progress=False)
    assert trainer.total_steps == 6  # 24 examples / 4 per batch = 6 batches per epoch; 2 epochs / 2 accum


def _count_compiles(monkeypatch):
    compiled = []

    def compile(self, **kw):  # what nn.Module.compile leaves, with the eager forward standing in
        compiled.append((self, kw))
        self._compiled_call_impl = self._call_impl

    monkeypatch.setattr(torch.nn.Module, "compile", compile)
    return compiled


def test_compile_compiles_every_decoder_layer_only_while_training(tokenizer, tmp_path, monkeypatch):
    compiled = _count_compiles(monkeypatch)
    trainer = _trainer(tokenizer, tmp_path, steps=2, compile="layers")
    layers = trainer.unwrapped_model().get_base_model().model.layers
    trainer.train()
    assert [m for m, _ in compiled] == list(layers) and all(kw == {"dynamic": True} for _, kw in compiled)
    assert all(layer._compiled_call_impl is None for layer in layers)  # eager again after training


def test_compile_mlp_compiles_the_mlp_and_norms_and_keeps_prefix_sharing(tokenizer, tmp_path, monkeypatch):
    compiled = _count_compiles(monkeypatch)
    trainer = _trainer(tokenizer, tmp_path, steps=2, compile="mlp")
    layers = trainer.unwrapped_model().get_base_model().model.layers
    assert trainer.share_prefix
    trainer.train()
    expected = [m for layer in layers for m in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm)]
    assert {id(m) for m, _ in compiled} == {id(m) for m in expected} and len(compiled) == len(expected)
    assert all(m._compiled_call_impl is None for m in expected)


def test_compile_is_off_by_default_and_for_methods_that_reach_inside_layers(tokenizer, tmp_path, monkeypatch):
    from alignshield.align.tvaccine import TVaccineTrainer
    from alignshield.align.vaccine import VaccineTrainer
    from alignshield.finetune.surgery import SurgeryTrainer

    compiled = _count_compiles(monkeypatch)
    _trainer(tokenizer, tmp_path / "default", steps=1).train()
    assert not compiled
    assert not any(cls.compiles for cls in (VaccineTrainer, TVaccineTrainer, SurgeryTrainer))
    assert Trainer.compiles


@pytest.mark.slow
def test_compiled_training_matches_eager(tokenizer, tmp_path):
    """A real inductor compile (a C++ compiler is needed): the same losses as eager, to rounding."""
    torch.manual_seed(0)
    eager = _trainer(tokenizer, tmp_path / "eager", steps=3)
    eager.train()
    torch.manual_seed(0)
    compiled = _trainer(tokenizer, tmp_path / "compiled", steps=3, compile="layers")
    compiled.train()
    a, b = ([h["loss"] for h in t.history] for t in (eager, compiled))
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    for (name, p), (_, q) in zip(_lora_state(eager).items(), _lora_state(compiled).items()):
        assert torch.allclose(p, q, rtol=1e-3, atol=1e-5), name


def test_compile_off_keeps_the_stage_keys_and_on_changes_them(tmp_path):
    from alignshield import stages
    from alignshield.config import load_config

    def cfg(*extra):
        return load_config(overrides=["model.name=" + str(tmp_path), f"output_dir={tmp_path}", *extra])

    assert "compile" not in stages._key(cfg().align)["train"]  # keys computed before the field existed hold
    assert "compile" not in stages._key(cfg().finetune)["train"]
    base = stages.stage_dirs(cfg())
    assert stages.stage_dirs(cfg("align.train.compile=none", "finetune.train.compile=none")) == base
    on = stages.stage_dirs(cfg("align.train.compile=layers"))
    assert on["align"] != base["align"] and on["finetune"] != base["finetune"]  # rounding differs: its own folder
    assert stages.stage_dirs(cfg("finetune.train.compile=mlp"))["align"] == base["align"]


def test_compile_layers_turns_prefix_sharing_off(tokenizer, tmp_path, monkeypatch):
    _count_compiles(monkeypatch)
    assert _trainer(tokenizer, tmp_path / "a", steps=1).share_prefix
    assert not _trainer(tokenizer, tmp_path / "b", steps=1, compile="layers").share_prefix
