"""Issue-15 speed paths keep exact semantics: labelled-position logits, length-grouped batches."""

import pytest
import torch

from alignshield.config import LoraSettings, MethodParams, TrainSettings
from alignshield.data import Example
from alignshield.data.collate import PadCollator, tokenize_pair
from alignshield.models.lora import attach_lora
from alignshield.train import EpochSampler, LengthGroupedSampler, Trainer, causal_lm_loss, labelled_logits
from conftest import TINY_FAMILIES, make_model

LORA = LoraSettings(r=4, alpha=8, target_modules="all-linear")


def _batch(tokenizer, n=5):
    items = [tokenize_pair(tokenizer, Example("word " * (1 + 2 * i), "", "I'm sorry " * (1 + i % 3)), "alpaca", 128)
             for i in range(n)]
    return PadCollator(tokenizer.eos_token_id)(items)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_labelled_loss_and_gradients_equal_transformers(family, tokenizer):
    model = attach_lora(make_model(family, dtype=torch.float64), LORA).eval()  # no dropout: one function
    batch = _batch(tokenizer)
    assert (batch["labels"][:, 1:] == -100).float().mean() > 0.5  # most positions are masked
    params = [p for p in model.parameters() if p.requires_grad]
    ours = causal_lm_loss(model, batch)
    g_ours = torch.autograd.grad(ours, params)
    theirs = model(**batch).loss
    g_theirs = torch.autograd.grad(theirs, params)
    # the same float32 cross-entropy; only the head's matmul sees fewer rows (BLAS may block it differently)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


def test_head_runs_only_at_labelled_positions(tokenizer):
    model = attach_lora(make_model(), LORA)
    batch = _batch(tokenizer)
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.shape))
    _, logits, targets = labelled_logits(model, batch)
    handle.remove()
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert seen == [torch.Size([n, 320])] and logits.shape == (n, 320) and targets.shape == (n,)


def test_a_head_that_does_not_read_hidden_states_falls_back_to_full_logits(tokenizer, caplog):
    class Reshaping(torch.nn.Module):  # a head whose model reshapes its output: the sparse input breaks it
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_output_embeddings(self):
            return self.inner.lm_head

        def forward(self, input_ids, attention_mask):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
            out.logits = out.logits.view(*input_ids.shape, -1)
            return out

    inner = make_model(dtype=torch.float64)
    batch = _batch(tokenizer)
    loss = causal_lm_loss(Reshaping(inner), batch)
    assert torch.equal(loss, inner(**batch).loss)
    assert "computing full logits" in caplog.text


def test_no_label_in_the_batch_gives_zero_loss_not_nan(tokenizer):
    model = attach_lora(make_model(), LORA)
    batch = _batch(tokenizer)
    batch["labels"][:] = -100
    loss = causal_lm_loss(model, batch)
    assert float(loss) == 0.0 and loss.requires_grad


def test_length_grouped_batches_are_a_seeded_permutation_with_less_padding():
    lengths = [(i * 37) % 120 + 8 for i in range(200)]
    grouped = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    order = list(grouped)
    assert sorted(order) == list(range(200))
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=3)) == order  # deterministic (resumable)
    grouped.set_epoch(1)
    assert list(grouped) != order  # a new order each epoch
    plain = list(EpochSampler(200, seed=3))

    def padding(o):
        batches = [o[i:i + 8] for i in range(0, len(o), 8)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches)

    assert padding(order) < padding(plain) / 4


def test_grouped_training_resumes_bit_identically(tokenizer, tmp_path):
    data = [tokenize_pair(tokenizer, Example("word " * (1 + i % 9), "", "I'm sorry."), "alpaca", 64) for i in range(24)]

    def trainer(path, steps=6):
        args = TrainSettings(learning_rate=5e-3, max_steps=steps, batch_size=4, checkpoint_every=3)
        return Trainer(attach_lora(make_model(), LORA), data, args, MethodParams(), seed=0, workdir=path,
                       pad_token_id=tokenizer.eos_token_id, progress=False)

    full = trainer(tmp_path / "a")
    full.train()
    cut = trainer(tmp_path / "b", steps=3)
    cut.train()
    cut._save_checkpoint()  # what an interrupted run leaves at step 3
    resumed = trainer(tmp_path / "b")
    assert resumed.train()["steps_this_session"] == 3
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


@pytest.mark.parametrize("family,attention", [(f, None) for f in TINY_FAMILIES] + [("llama", "eager"),
                                                                                    ("qwen2", "eager")])
def test_a_shared_prefix_computed_once_gives_the_same_loss_and_gradients(family, attention, tokenizer):
    """Both attention kernels (eager: what bfloat16 training on a CPU resolves to, models/hardware.py)."""
    from alignshield.train import shared_prefix_length

    model = attach_lora(make_model(family, dtype=torch.float64, attention=attention), LORA).eval()  # no dropout
    batch = _batch(tokenizer)
    shared = shared_prefix_length(batch)
    assert shared >= 8 and (batch["labels"][:, : shared + 1] == -100).all()
    params = [p for p in model.parameters() if p.requires_grad]
    ours = causal_lm_loss(model, batch, share_prefix=True)
    g_ours = torch.autograd.grad(ours, params)
    theirs = model(**batch).loss
    g_theirs = torch.autograd.grad(theirs, params)
    # float64 model, float32 cross-entropy (as transformers): agreement to float32 precision
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    scale = max(float(g.abs().max()) for g in g_theirs)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale)


def test_prefix_sharing_runs_the_prefix_once(tokenizer):
    from alignshield.train import shared_prefix_length

    model = attach_lora(make_model(), LORA)
    batch = _batch(tokenizer)
    lengths = []
    embed = model.get_base_model().base_model.embed_tokens
    handle = embed.register_forward_hook(lambda m, a, out: lengths.append(tuple(out.shape[:2])))
    causal_lm_loss(model, batch, share_prefix=True)
    handle.remove()
    b, t = batch["input_ids"].shape
    p = shared_prefix_length(batch)
    assert lengths == [(1, p), (b, t - p)]


def test_prefix_sharing_is_off_where_it_would_change_the_math(tokenizer, tmp_path):
    from alignshield.align.vaccine import VaccineParams, VaccineTrainer

    data = [tokenize_pair(tokenizer, Example("word", "", "I'm sorry."), "alpaca", 64) for _ in range(8)]
    args = TrainSettings(max_steps=1, batch_size=4)

    def make(cls, params, lora=LORA, **kw):
        return cls(attach_lora(make_model(), lora), data, args.model_copy(update=kw), params, seed=0,
                   workdir=tmp_path, pad_token_id=0, progress=False)

    assert make(Trainer, MethodParams()).share_prefix
    assert not make(Trainer, MethodParams(), share_prefix=False).share_prefix
    assert not make(VaccineTrainer, VaccineParams()).share_prefix  # perturbs every position per row
    assert not make(Trainer, MethodParams(), lora=LORA.model_copy(update={"dropout": 0.1})).share_prefix


def test_generation_feeds_the_head_a_contiguous_input_and_shares_prefixes_exactly(tokenizer):
    import copy

    from alignshield.evaluate.generate import generate_batch

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token  # as models.load.load_tokenizer does
    model = make_model(layers=2)
    for p in model.parameters():
        p.requires_grad_(False)  # as a merged model: the frozen head is where the slow path hid
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    prompts = [f"Below is an instruction. ### Instruction: word {'word ' * i}### Response:" for i in range(6)]
    shared = generate_batch(model, tokenizer, prompts, max_new_tokens=5, batch_size=3, progress=False)
    handle.remove()
    plain = generate_batch(model, tokenizer, prompts, max_new_tokens=5, batch_size=3, progress=False,
                           share_prefix=False)
    assert seen and all(seen)
    assert shared.answers == plain.answers and shared.new_tokens == plain.new_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_log_prob_equals_autograd_log_softmax(dtype):
    """The chunked log-softmax at the targets and its backward equal autograd's float32 version (77
    rows: two full chunks and a partial one)."""
    from alignshield.train import TargetLogProb

    torch.manual_seed(0)
    logits = (4 * torch.randn(77, 500)).to(dtype).requires_grad_()
    targets = torch.randint(0, 500, (77,))
    weights = torch.rand(77)  # an upstream gradient that differs per row
    ours = TargetLogProb.apply(logits, targets)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    theirs = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    (g_theirs,) = torch.autograd.grad((theirs * weights).sum(), logits)
    assert ours.dtype == torch.float32 and g_ours.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-5}
    torch.testing.assert_close(g_ours, g_theirs, **tol)


def test_adapter_compute_model_autocasts_only_the_forward_and_keeps_float32_master_weights(tokenizer, tmp_path):
    """``model.adapter_compute``: on a bfloat16 base the float32 LoRA computes in bfloat16 under
    autocast (``model``/``auto``) or in float32 (``float32``); its weights, gradients and optimizer
    stay float32, the model's forward is restored after training, the losses agree to bf16 precision."""
    from alignshield.config import ModelConfig

    data = [tokenize_pair(tokenizer, Example(f"question {i}", "", "I'm sorry, I cannot help."), "alpaca", 64)
            for i in range(16)]
    losses = {}
    for setting in ("model", "float32"):
        model = attach_lora(make_model(dtype=torch.bfloat16), LORA)
        seen = []
        lora_a = next(m for n, m in model.named_modules() if n.endswith("q_proj.lora_A.default"))
        lora_a.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
        trainer = Trainer(model, data, TrainSettings(learning_rate=1e-3, max_steps=3, batch_size=4), MethodParams(),
                          seed=0, workdir=tmp_path / setting, pad_token_id=tokenizer.eos_token_id,
                          model_config=ModelConfig(adapter_compute=setting), progress=False)
        trainer.train()
        expected = torch.bfloat16 if setting == "model" else torch.float32
        assert seen and set(seen) == {expected}
        assert all(p.dtype == torch.float32 for p in trainer.trainable)
        assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())
        assert "forward" not in vars(trainer.model)
        losses[setting] = [h["loss"] for h in trainer.history]
    assert ModelConfig().adapter_compute == "auto"
    torch.testing.assert_close(torch.tensor(losses["model"]), torch.tensor(losses["float32"]), rtol=2e-2, atol=0)


def test_shape_roofline_times_every_product_of_a_step(monkeypatch):
    """benchmarks/throughput.py's shape roofline: each decoder projection forward and input gradient at the
    step's rows, each LoRA's six products, the head at the labelled positions; the rate is FLOPs over time."""
    import importlib.util
    from pathlib import Path

    from conftest import random_lora_model

    path = Path(__file__).parents[1] / "benchmarks" / "throughput.py"
    spec = importlib.util.spec_from_file_location("throughput_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    timed = []

    def fake_gflops(dtype, shape, reps, budget_s):
        timed.append(shape)
        return 10.0 if 7 in shape else 100.0  # the head's products slow, the rest fast

    monkeypatch.setattr("alignshield.models.hardware.matmul_gflops", fake_gflops)
    model = random_lora_model(r=4, targets=("q_proj", "v_proj"))
    cfg = model.config
    out = bench.shape_roofline(model, "float64", rows=50, labelled=7)
    h, mlp, r, L = cfg.hidden_size, cfg.intermediate_size, 4, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    # independently: every layer's projections (in, out, LoRA?) as the tiny Llama has them
    layer = [(h, h, True), (h, kv, False), (h, kv, True), (h, h, False), (h, mlp, False), (h, mlp, False), (mlp, h, False)]
    products = []
    for k, n, lora in layer * L:
        products += [(50, k, n), (50, n, k)]
        if lora:
            products += [(50, k, r), (50, r, n), (50, n, r), (50, r, k), (k, 50, r), (r, 50, n)]
    products += [(7, h, cfg.vocab_size), (7, cfg.vocab_size, h)]
    assert sorted(set(timed)) == sorted(set(products)) and len(timed) == len(set(timed))  # each shape timed once
    flops = [2 * m * k * n for m, k, n in products]
    seconds = sum(f / ((10.0 if 7 in shape else 100.0) * 1e9) for f, shape in zip(flops, products))
    assert out["gflops"] == round(sum(flops) / seconds / 1e9, 1)
    assert 10.0 < out["gflops"] < 100.0
