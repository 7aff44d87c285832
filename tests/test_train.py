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
