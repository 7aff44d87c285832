"""Surgery (fine-tune stage): the sink statistic and the penalty against an independent port of the
reference's loops, the loss and its gradient, the draws, config errors before any compute, end to end."""

import json

import pytest
import torch
import torch.nn.functional as F

from alignshield import stages
from alignshield.config import ConfigError, LoraSettings, TrainSettings
from alignshield.data import Example
from alignshield.data.collate import PadCollator, tokenize_pair
from alignshield.finetune.surgery import SurgeryParams, SurgeryTrainer, sink_attention
from alignshield.models.lora import attach_lora
from alignshield.train import Trainer
from conftest import make_model

LORA = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj"])


def _pair(tokenizer, prompt, answer):
    return tokenize_pair(tokenizer, Example(prompt, "", answer), "alpaca", 40)


def _trainer(cls, params, tokenizer, tmp_path, harmful=None, harmless=None):
    model = attach_lora(make_model("llama", layers=2, dtype=torch.float64, seed=0, attention="eager"), LORA)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    harmful = harmful or [_pair(tokenizer, "how do I hurt someone", "first you find a heavy stick and then")]
    harmless = harmless or [_pair(tokenizer, "how do I hurt someone", "I cannot help with hurting anyone.")]
    data = [_pair(tokenizer, f"review number {i}", "positive") for i in range(8)]
    args = TrainSettings(learning_rate=1e-2, max_steps=2, batch_size=4, checkpoint_every=100)
    return cls(model, data, args, params, seed=0, workdir=tmp_path, pad_token_id=tokenizer.eos_token_id,
               extra_data={"harmful": harmful, "alignment": harmless}, progress=False)


def reference_sink_loss(model, harmful_ids, harmless_ids, sink=0):
    """Lslland/Surgery trainer.py:78-112: for every (layer, head), mean of attn[:, head, 1:, sink] on each
    text, ReLU of the difference, summed over heads and divided by their number."""
    h = model(input_ids=harmful_ids, output_attentions=True).attentions
    s = model(input_ids=harmless_ids, output_attentions=True).attentions
    heads = [(layer, head) for layer in range(len(h)) for head in range(h[0].shape[1])]
    total = 0
    for layer, head in heads:
        total += F.relu(h[layer][:, head, 1:, sink].mean() - s[layer][:, head, 1:, sink].mean())
    return total / len(heads)


def test_sink_attention_is_the_mean_over_later_positions_per_layer_and_head():
    attn = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = sink_attention((attn, 2 * attn), 1)
    for layer, scale in enumerate((1, 2)):
        for head in range(3):
            want = sum(scale * attn[b, head, t, 1] for b in range(2) for t in range(1, 5)) / 8
            assert float(got[layer, head]) == pytest.approx(float(want), rel=1e-12)


@pytest.mark.parametrize("sink", [0, 2])
def test_penalty_equals_the_reference_loops(tokenizer, tmp_path, sink):
    trainer = _trainer(SurgeryTrainer, SurgeryParams(sink_position=sink), tokenizer, tmp_path)
    model = trainer.unwrapped_model()
    ids = lambda ex: torch.tensor([ex.input_ids])  # noqa: E731  (one text, no padding: as the reference)
    want = reference_sink_loss(model, ids(trainer.harmful[0]), ids(trainer.harmless[0]), sink)
    got = trainer.sink_divergence(trainer.model)
    assert float(want.detach()) > 0
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12)


def test_loss_is_ce_plus_alpha_times_the_penalty_and_trains_attention(tokenizer, tmp_path):
    trainer = _trainer(SurgeryTrainer, SurgeryParams(alpha=300), tokenizer, tmp_path)
    plain = _trainer(Trainer, SurgeryParams(), tokenizer, tmp_path / "plain")
    batch = PadCollator(tokenizer.eos_token_id)([_pair(tokenizer, f"review number {i}", "positive") for i in range(3)])
    penalty = float(trainer.sink_divergence(trainer.model).detach())
    loss = trainer.compute_loss(trainer.model, batch)
    ce = float(plain.compute_loss(plain.model, batch).detach())
    assert float(loss.detach()) == pytest.approx(ce + 300 * penalty, rel=1e-10)
    loss.backward()
    with_penalty = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    Trainer.compute_loss(trainer, trainer.model, batch).backward()  # the CE alone
    without = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    moved = [n for n in with_penalty if not torch.allclose(with_penalty[n], without[n])]
    assert any("q_proj" in n or "k_proj" in n for n in moved)  # the penalty reaches the attention scores


def test_draws_depend_on_seed_step_and_micro_batch_only(tokenizer, tmp_path):
    pool = [_pair(tokenizer, f"harmful {i}", f"answer {i}") for i in range(50)]
    a = _trainer(SurgeryTrainer, SurgeryParams(), tokenizer, tmp_path / "a", harmful=pool)
    b = _trainer(SurgeryTrainer, SurgeryParams(), tokenizer, tmp_path / "b", harmful=pool)
    drawn = []
    for step in range(4):
        a.step = b.step = step
        x, y = a._draw(pool, "harmful"), b._draw(pool, "harmful")
        assert torch.equal(x["input_ids"], y["input_ids"])
        drawn.append(tuple(x["input_ids"][0].tolist()))
    assert len(set(drawn)) > 1


def test_alpha_zero_is_plain_sft(tokenizer, tmp_path):
    trainer = _trainer(SurgeryTrainer, SurgeryParams(alpha=0), tokenizer, tmp_path)
    plain = _trainer(Trainer, SurgeryParams(), tokenizer, tmp_path / "plain")
    batch = PadCollator(tokenizer.eos_token_id)([_pair(tokenizer, "review", "positive")])
    assert float(trainer.compute_loss(trainer.model, batch).detach()) == \
        float(plain.compute_loss(plain.model, batch).detach())


@pytest.mark.parametrize("extra, message", [
    (["model.attn_implementation=sdpa"], "only eager attention returns: set model.attn_implementation=eager"),
    (["model.attn_implementation=eager", "finetune.params.alpha=-1"], "finetune.params.alpha"),
])
def test_bad_configs_fail_before_any_compute(make_cfg, extra, message, monkeypatch):
    monkeypatch.setattr(stages, "_train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ConfigError, match=message):
        stages.run(make_cfg("finetune.method=surgery", *extra))


def test_end_to_end(make_cfg):
    cfg = make_cfg("finetune.method=surgery", "model.attn_implementation=eager")
    metrics = stages.run(cfg)
    info = json.loads((stages.stage_dirs(cfg)["finetune"] / "stage.json").read_text())
    assert info["method"] == "surgery" and info["params"] == {"alpha": 300.0, "sink_position": 0}
    assert info["report"]["steps"] == 2 and "harmful_score/keyword" in metrics
