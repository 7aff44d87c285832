"""DDP for real on CPU: two processes (torchrun, gloo), tiny models built in code.

The test launches this file under ``python -m torch.distributed.run --nproc_per_node 2``; each rank
trains sft, vaccine and t-vaccine for a few steps on its own shard of the data and saves what it
ends with, then both ranks run a two-run sweep through the real stages. The parent process checks:
parameters identical across ranks (and changed by training), T-Vaccine's sampled layers identical
across ranks, Vaccine's perturbation of global norm rho on each rank (rho is per rank), and that the
sweep's stage folders and database were written once, completely, with no ``.partial`` left, and
that the evaluation was split between the ranks and equals a one-process evaluation.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
METHODS = ("sft", "vaccine", "t-vaccine", "repnoise")
RHO = 2.0


# ------------------------------------------------------------------------------ the worker


def worker(out: Path, model_dir: Path) -> None:
    from accelerate import PartialState

    from alignshield.align.repnoise import RepNoiseParams, RepNoiseTrainer
    from alignshield.align.tvaccine import TVaccineParams, TVaccineTrainer
    from alignshield.align.vaccine import VaccineParams, VaccineTrainer
    from alignshield.config import LoraSettings, MethodParams, TrainSettings
    from alignshield.data import Example
    from alignshield.data.collate import tokenize_pair
    from alignshield.experiments.sweep import load_sweep, run_sweep
    from alignshield.models.lora import attach_lora
    from alignshield.train import Trainer
    from conftest import make_model, make_tokenizer

    state = PartialState(cpu=True)
    rank = state.process_index
    tok = make_tokenizer()
    data = [tokenize_pair(tok, Example(f"question number {i}", "", "I'm sorry, I cannot help with that."),
                          "alpaca", 48) for i in range(16)]
    harmful = [tokenize_pair(tok, Example(f"bad question {i}", "", "Sure, here is how to do it step by step."),
                             "alpaca", 48) for i in range(8)]
    lora = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
    setups = {
        "sft": (Trainer, MethodParams()),
        "vaccine": (VaccineTrainer, VaccineParams(rho=RHO)),
        "t-vaccine": (TVaccineTrainer, TVaccineParams(rho=RHO, layers_per_step=2, score_every=2,
                                                      resample_every=1, score_batch_size=2)),
        "repnoise": (RepNoiseTrainer, RepNoiseParams()),
    }
    for name, (cls, params) in setups.items():
        model = attach_lora(make_model("llama", layers=4, seed=0), lora)
        initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        # grad_accum=2 on sft and vaccine: the no_sync micro-batches, and Vaccine's pass 1 inside them
        args = TrainSettings(learning_rate=1e-2, max_steps=4, batch_size=2, checkpoint_every=2,
                             grad_accum=1 if name == "t-vaccine" else 2)
        trainer = cls(model, data, args, params, seed=0, workdir=out / "train" / name,
                      pad_token_id=tok.eos_token_id, extra_data={"harmful": harmful}, progress=False)
        norms: list[float] = []
        if name == "vaccine":
            original = trainer.perturbation

            def recording(batch, layers, original=original):
                e = original(batch, layers)
                norms.append(float(torch.sqrt(sum(t.float().pow(2).sum() for t in e.values()))))
                return e

            trainer.perturbation = recording
        harmful_seen: list = []
        if hasattr(trainer, "harmful_batch"):
            draw = trainer.harmful_batch

            def recording_draw(salt=0, draw=draw):
                batch = draw(salt)
                harmful_seen.append(batch["input_ids"].tolist())
                return batch

            trainer.harmful_batch = recording_draw
        seen: list = []
        step = trainer.training_step

        def recording_step(batch, step=step, seen=seen):
            seen.append(batch["input_ids"].tolist())
            return step(batch)

        trainer.training_step = recording_step
        trainer.train()
        final = {n: p.detach().clone() for n, p in trainer.unwrapped_model().named_parameters() if n in initial}
        trainer.finish()
        torch.save({"initial": initial, "final": final, "norms": norms, "first_batch": seen[0],
                    "draws": getattr(trainer, "draws", None), "harmful": harmful_seen,
                    "history": trainer.history}, out / f"{name}-rank{rank}.pt")
    state.wait_for_everyone()

    import alignshield.evaluate.backends as backends

    generate, generated = backends.generate_batch, []

    def counting(model, tokenizer, prompts, **options):  # how many prompts this rank answers
        generated.append(len(prompts))
        return generate(model, tokenizer, prompts, **options)

    backends.generate_batch = counting
    sweep = load_sweep(out / "grid.yaml", overrides=[f"model.name={model_dir}", f"output_dir={out / 'runs'}"])
    outcome = run_sweep(sweep)
    (out / f"generated-rank{rank}.json").write_text(json.dumps(generated))
    (out / f"sweep-rank{rank}.json").write_text(json.dumps(
        {"computed": outcome.computed, "cached": outcome.cached, "keys": [r.key for r in sweep.runs]}))


# ------------------------------------------------------------------------------ the test

GRID = """
overrides:
  model.dtype: float32
  align.data.safety.stop: 8
  align.data.benign.stop: 8
  align.data.harmful.stop: 2008
  align.train: {max_steps: 2, batch_size: 2, max_length: 48}
  align.lora.target_modules: [q_proj, v_proj]
  align.params: {layers_per_step: 1, score_batch_size: 2}
  finetune.lora.target_modules: [q_proj, v_proj]
  finetune.n: 8
  finetune.train: {max_steps: 2, batch_size: 2, max_length: 48}
  evaluate.harmful.stop: 4
  evaluate.task_n: 4
  evaluate.max_new_tokens: 4
grid:
  align.method: [t-vaccine]
  finetune.p: [0.0, 0.5]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("ddp")
    (out / "grid.yaml").write_text(GRID)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(HERE), str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(Path(__file__)), "--worker", str(out), str(tiny_model_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return out


def _load(out: Path, name: str, rank: int) -> dict:
    return torch.load(out / f"{name}-rank{rank}.pt", weights_only=False)


@pytest.mark.parametrize("name", METHODS)
def test_parameters_identical_across_ranks_and_trained(ddp_run, name):
    r0, r1 = _load(ddp_run, name, 0), _load(ddp_run, name, 1)
    assert r0["first_batch"] != r1["first_batch"]  # each rank trains on its own shard
    assert r0["final"].keys() == r1["final"].keys() and r0["final"]
    for key in r0["final"]:
        assert torch.equal(r0["final"][key], r1["final"][key]), key
    changed = [k for k in r0["final"] if not torch.equal(r0["final"][k], r0["initial"][k])]
    assert changed, "training changed nothing"
    assert [h["loss"] for h in r0["history"]] == [h["loss"] for h in r1["history"]]  # the gathered mean


def test_tvaccine_samples_the_same_layers_on_every_rank(ddp_run):
    d0, d1 = _load(ddp_run, "t-vaccine", 0)["draws"], _load(ddp_run, "t-vaccine", 1)["draws"]
    assert len(d0) == 4 and d0 == d1  # resample_every=1: a draw per step
    assert all(len(d["layers"]) == 2 for d in d0)
    # frozen layers did not train: a layer never drawn keeps its initial attention LoRA weights (the
    # default, as the reference, freezes attention LoRA only; MLP LoRA trains in every layer)
    r0 = _load(ddp_run, "t-vaccine", 0)
    drawn = {i for d in d0 for i in d["layers"]}
    for key, value in r0["final"].items():
        layer = int(key.split(".layers.")[1].split(".")[0])
        if layer not in drawn and ".self_attn." in key:
            assert torch.equal(value, r0["initial"][key]), key


def test_harmful_batches_differ_across_ranks(ddp_run):
    """RepNoise's harmful batches are drawn per (seed, step, micro-batch, rank): the ranks see different
    harmful examples (as they see different shards of the data), and every step draws anew."""
    h0, h1 = _load(ddp_run, "repnoise", 0)["harmful"], _load(ddp_run, "repnoise", 1)["harmful"]
    assert len(h0) == len(h1) >= 4
    assert h0 != h1 and h0[0] != h1[0]
    assert len({str(b) for b in h0}) > 1


def test_vaccine_rho_is_per_rank(ddp_run):
    n0, n1 = _load(ddp_run, "vaccine", 0)["norms"], _load(ddp_run, "vaccine", 1)["norms"]
    assert len(n0) == len(n1) == 8  # 4 steps x 2 micro-batches
    # each rank scales its own micro-batch's perturbation to rho: per rank, not across ranks
    assert all(abs(n - RHO) < 1e-3 for n in n0 + n1)


def test_sweep_under_ddp_writes_once_and_completely(ddp_run):
    runs = ddp_run / "runs"
    s0 = json.loads((ddp_run / "sweep-rank0.json").read_text())
    s1 = json.loads((ddp_run / "sweep-rank1.json").read_text())
    assert s0 == s1 and len(s0["computed"]) == 2
    assert not list(runs.rglob("*.partial"))
    assert len(list((runs / "align").iterdir())) == 1  # shared by both fine-tunes
    for stage in ("finetune", "evaluate"):
        assert len(list((runs / stage).iterdir())) == 2
    for d in (runs / "finetune").iterdir():
        assert (d / "adapter" / "adapter_model.safetensors").exists() and (d / "stage.json").exists()
    with sqlite3.connect(runs / "results.sqlite") as db:
        keys = {k for (k,) in db.execute("select run_key from runs")}
        world = {w for (w,) in db.execute("select world_size from runs")}
    assert keys == set(s0["keys"]) and world == {2}


def test_evaluation_is_sharded_across_ranks_and_equals_one_process(ddp_run):
    from alignshield import stages
    from alignshield.config import load_config
    from alignshield.evaluate.metrics import generate_answers

    g0, g1 = (json.loads((ddp_run / f"generated-rank{r}.json").read_text()) for r in (0, 1))
    # two evaluations (harmful prompts, then SST-2), 4 prompts each: 2 per rank, not 4 on both
    assert g0 == g1 == [2, 2, 2, 2]
    for folder in (ddp_run / "runs" / "evaluate").iterdir():
        cfg = load_config([folder / "config.yaml"])
        model, tokenizer = stages.final_model(cfg)
        metrics, samples = generate_answers(model, tokenizer, cfg)  # one process, every prompt
        saved = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
        assert [s["answer"] for s in saved] == [s["answer"] for s in samples]
        stored = json.loads((folder / "metrics.json").read_text())
        assert {k: stored[k] for k in metrics} == metrics


@pytest.mark.parametrize("name, kind", [("single_gpu", "NO"), ("multi_gpu", "MULTI_GPU"), ("zero2", "DEEPSPEED"),
                                        ("fsdp", "FSDP")])
def test_shipped_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    from alignshield.config import PRESETS_DIR

    path = PRESETS_DIR.parent / "accelerate" / f"{name}.yaml"
    assert load_config_from_file(str(path)).distributed_type.name == kind


if __name__ == "__main__" and "--worker" in sys.argv:
    i = sys.argv.index("--worker")
    worker(Path(sys.argv[i + 1]), Path(sys.argv[i + 2]))
