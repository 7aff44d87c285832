"""The training loop every method shares: LoRA SFT with resumable, atomic checkpoints.

A method subclasses ``Trainer`` and overrides only what differs (TRL style): ``training_step`` for
Vaccine's two passes, ``on_step_start`` for T-Vaccine's layer sampling, ``compute_loss`` for a
regularised loss. Runs on one CPU, one GPU, or under ``accelerate launch`` / ``torchrun`` (DDP).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from alignshield.config import MethodParams, ModelConfig, TrainSettings
from alignshield.data.collate import IGNORE_INDEX, PadCollator, Tokenized
from alignshield.models.layers import DecoderLayout, cache_argument, discover, prefix_cache
from alignshield.seeding import generator

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch, derived from (seed, epoch) alone, so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=generator(self.seed, "epoch", self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


class LengthGroupedSampler(EpochSampler):
    """``EpochSampler``'s permutation, then, within each window of ``window`` batches, examples sorted
    by prompt template and length, so each batch holds similar lengths (little compute goes to
    padding) and one template's preamble (``train.share_prefix`` computes it once); the batches are
    then shuffled. Derived from (seed, epoch) alone: deterministic and resumable.

    transformers' ``group_by_length`` idea; every example is still seen once per epoch, and a batch is
    still a random draw of its window's (template, length) stratum.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, window: int = 16,
                 templates: list[int] | None = None):
        super().__init__(len(lengths), seed)
        self.lengths, self.batch_size, self.window = lengths, batch_size, window
        self.templates = templates or [0] * len(lengths)

    def __iter__(self):
        g = generator(self.seed, "epoch", self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        span = self.batch_size * self.window
        batches = []
        for start in range(0, self.n, span):
            chunk = sorted(order[start:start + span], key=lambda i: (self.templates[i], -self.lengths[i]))
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # a short last batch stays last (the DataLoader cuts batches from the flat order)
        full = [b for b in batches if len(b) == self.batch_size]
        rest = [b for b in batches if len(b) < self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
        return iter([i for b in shuffled + rest for i in b])


MIN_SHARED_PREFIX = 8  # tokens: below this the extra forward call costs more than sharing saves


def shared_prefix_length(batch: dict[str, torch.Tensor]) -> int:
    """Tokens at the start that every row of the batch has in common (the template's preamble, a
    shared instruction) and that predict no label: they can be computed once for the whole batch.
    0 when that is fewer than ``MIN_SHARED_PREFIX`` tokens or the batch has one row."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if ids.shape[0] < 2:
        return 0
    same = ((ids == ids[:1]).all(0) & mask.bool().all(0)).long()
    common = int(same.cumprod(0).sum())
    labelled = (labels != IGNORE_INDEX).any(0).nonzero()
    first_label = int(labelled[0]) if len(labelled) else ids.shape[1]
    # positions t < P must predict no label: the token at t + 1 <= P is a prompt token
    shared = min(common, first_label - 1)
    return shared if shared >= MIN_SHARED_PREFIX else 0


def _prefix_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor], shared: int) -> dict:
    """Inputs that make ``model`` compute every row from the shared prefix's cache on (computed once):
    exactly what the full forward computes for the rest of each row."""
    ids = batch["input_ids"]
    cache = prefix_cache(model, ids[:1, :shared], ids.shape[0])
    positions = torch.arange(shared, ids.shape[1], device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)
    return {"input_ids": ids[:, shared:], cache_argument(model): cache,
            "position_ids": positions}


def labelled_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], sparse: bool = True,
                    share_prefix: bool = False, **kwargs):
    """The model's outputs and its logits at the positions that predict a label.

    Causal-LM losses read the logits at positions t whose next token t+1 is a label (not
    ``IGNORE_INDEX``): the prompt and padding are masked anyway. With ``sparse`` a pre-hook on the
    output head gives it just those hidden states, so the (vocabulary-sized) head, its softmax and
    their backward run on a fraction of the tokens; without, the full logits are computed and those
    rows selected. With ``share_prefix`` the tokens every row starts with (``shared_prefix_length``)
    are computed once, not once per row. The same values either way (up to float rounding).
    Returns ``(outputs, logits [N, V], targets [N])``; ``outputs`` carries the rest (e.g.
    ``hidden_states`` when asked for in ``kwargs``, which turns prefix sharing off). A model whose
    head does not take the last hidden states as its input falls back to full logits, with a warning.
    """
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    shared = shared_prefix_length(batch) if share_prefix and not kwargs else 0
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **kwargs}
    if shared:
        inputs |= _prefix_inputs(model, batch, shared)
    rows = keep[:, shared:]  # the positions this forward computes, minus the last
    inner = getattr(model, "module", model)  # DDP
    head = inner.get_output_embeddings() if sparse and hasattr(inner, "get_output_embeddings") else None
    if head is None or type(inner) in _FULL_LOGITS:
        out = model(**inputs)
        return out, out.logits[:, :-1][rows], targets[keep]

    def select(module, args):
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[1] != rows.shape[1] + 1:
            raise _HeadMismatch
        return (hidden[:, :-1][rows], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        out = model(**inputs)
    except (_HeadMismatch, RuntimeError):  # e.g. a model that reshapes the logits to (batch, length, vocab);
        out = None  # a real error raises again from the full-logits path below
    finally:
        handle.remove()
    if out is None or out.logits.dim() != 2 or out.logits.shape[0] != int(keep.sum()):
        log.warning("%s: its output head does not read the last hidden states as expected; computing full "
                    "logits for this model (same loss, slower)", type(inner).__name__)
        _FULL_LOGITS.add(type(inner))
        return labelled_logits(model, batch, sparse=False, share_prefix=share_prefix, **kwargs)
    return out, out.logits, targets[keep]


class _HeadMismatch(Exception):
    pass


_FULL_LOGITS: set[type] = set()


class TargetLogProb(torch.autograd.Function):
    """log softmax(logits)[i, targets[i]] per row, in float32, without the [N, V] float32 copies.

    What ``log_softmax(logits.float()).gather(1, targets)`` computes, rows in chunks of
    ``CHUNK``: forward keeps only the per-row log-sum-exp; backward rebuilds the softmax chunk by
    chunk, ``d/dlogits = g * (onehot - softmax)``, in float32, cast to the logits' dtype. The
    autograd version keeps a float32 log-softmax of the whole [N, V] block for backward and fills a
    zero [N, V] block for the gather; at the 49k-token vocabulary of SmolLM2 and ~700 labelled
    positions that is ~0.3 GB of traffic per step. The loss is the same formula (x - max - log sum
    exp(x - max)); the sum's order, hence the last float32 bits, may differ."""

    CHUNK = 32

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, step = logits.shape[0], TargetLogProb.CHUNK
        picked = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(picked)
        for i in range(0, n, step):
            x = logits[i:i + step].float()
            peak = x.amax(1, keepdim=True)
            log_sum = (x - peak).exp_().sum(1, keepdim=True).log_()
            picked[i:i + step] = (x.gather(1, targets[i:i + step, None]) - peak - log_sum).squeeze(1)
            lse[i:i + step] = (peak + log_sum).squeeze(1)
        ctx.save_for_backward(logits, targets, lse)
        return picked

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        out, step = torch.empty_like(logits), TargetLogProb.CHUNK
        for i in range(0, logits.shape[0], step):
            p = (logits[i:i + step].float() - lse[i:i + step, None]).exp_()  # softmax
            p.scatter_add_(1, targets[i:i + step, None], p.new_full((p.shape[0], 1), -1.0))
            out[i:i + step] = p.mul_(-grad[i:i + step, None])
        return out, None


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor,
                        fused: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy of the labelled-position ``logits`` [N, V], what transformers'
    causal-LM loss computes on the full logits: a float32 log-softmax per row (``TargetLogProb`` when
    ``fused``; else, and for float64 logits, which exist to check the math, autograd's
    ``log_softmax(logits.float())``, bit for bit transformers'), then ``nll_loss`` with
    ``ignore_index`` over every position of ``labels``, so its summation order is the same. No label
    at all (every answer cut off by max_length) gives 0 with a graph, not NaN."""
    if not len(targets):
        return logits.float().sum() * 0
    if not fused or logits.dtype == torch.float64:
        picked = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])
    else:
        picked = TargetLogProb.apply(logits, targets)[:, None]
    keep = (labels[:, 1:] != IGNORE_INDEX).reshape(-1)
    every = picked.new_zeros(keep.numel(), 1).index_put((keep,), picked)
    return torch.nn.functional.nll_loss(every, torch.where(keep, 0, IGNORE_INDEX), ignore_index=IGNORE_INDEX)


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], sparse: bool = True,
                   share_prefix: bool = False) -> torch.Tensor:
    """What ``model(**batch).loss`` computes (mean cross-entropy over the answer tokens), with the
    logits computed at the labelled positions only when ``sparse`` and the batch's common prefix
    computed once when ``share_prefix`` (``labelled_logits``); ``sparse`` also takes the chunked
    log-softmax (``TargetLogProb``)."""
    _, logits, targets = labelled_logits(model, batch, sparse=sparse, share_prefix=share_prefix)
    return token_cross_entropy(logits, targets, batch["labels"], fused=sparse)


class Trainer:
    """Supervised fine-tuning of the model's trainable (LoRA) parameters on tokenized pairs."""

    Params = MethodParams
    trains = True
    shares_prefix = True
    """Whether ``compute_loss`` may compute a batch's common prefix once (``train.share_prefix``). A
    method that reads per-row activations of the prompt (Vaccine's perturbation of every position,
    LDIFS's features) sets False."""
    compiles = True
    """Whether ``train.compile`` may compile the decoder layers. A method that hooks, freezes or reads
    the inside of a layer during training (Vaccine's perturbation, T-Vaccine's layer draws, LDIFS's
    features, Surgery's attention weights, ...) sets False and trains eagerly."""
    ddp_find_unused_parameters = True
    """DDP: look for parameters without a gradient each step (one walk of the autograd graph). True
    by default because a method may freeze parameters after the model is wrapped (T-Vaccine); a
    method that never does may set False and save the walk."""

    def __init__(
        self,
        model: torch.nn.Module,
        train_set: list[Tokenized],
        args: TrainSettings,
        params: MethodParams,
        *,
        seed: int,
        workdir: Path,
        pad_token_id: int,
        extra_data: dict[str, list[Tokenized]] | None = None,
        model_config: ModelConfig | None = None,
        progress: bool = True,
        tracking=None,
    ):
        from accelerate import Accelerator

        if not train_set:
            raise ValueError("the training set is empty")
        self.args, self.params, self.seed = args, params, seed
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra_data = extra_data or {}
        self.model_config = model_config or ModelConfig()
        self.collate = PadCollator(pad_token_id)
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType

        # DDP only (ignored in one process): methods may freeze parameters mid-run (T-Vaccine trains
        # S layers at a time); DDP must then not wait for their gradients, or the next step fails.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=self.ddp_find_unused_parameters)
        self.tracking = tracking  # tracking.Tracking: experiment trackers mirror the loss log (None: none)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp],
                                       **(tracking.accelerator_kwargs() if tracking else {}))
        if self.accelerator.distributed_type == DistributedType.FSDP:
            # Checkpoints and the saved adapter are read from rank 0's parameters, which FSDP shards;
            # refuse rather than write a wrong adapter (docs/scale.md: use DDP or ZeRO-2).
            raise NotImplementedError("alignshield's LoRA trainer does not support FSDP yet (sharded parameters "
                                      "cannot be saved from rank 0); launch with multi_gpu.yaml (DDP) or zero2.yaml")
        # ZeRO shards the optimizer state per rank, so rank 0's checkpoint cannot resume the others:
        # under DeepSpeed an interrupted stage restarts from step 0 instead of resuming.
        self.resumable = self.accelerator.distributed_type != DistributedType.DEEPSPEED
        self.progress = progress and self.accelerator.is_main_process
        self.sampler = (LengthGroupedSampler([len(t.input_ids) for t in train_set], args.batch_size, seed,
                                             templates=[t.template for t in train_set])
                        if args.group_by_length else EpochSampler(len(train_set), seed))
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=self.sampler, collate_fn=self.collate)
        # names fixed now: methods may freeze some of them for a while (T-Vaccine), checkpoints keep all
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "use_cache", None):
            # training reads no cache; a model left with use_cache=True would build one in every forward,
            # which activation checkpointing then replays (and appends to) in backward (transformers 4.x)
            config.use_cache = False
        self.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("the model has no trainable parameters (is a LoRA adapter attached?)")
        optimizer = self._make_optimizer()
        self.model, self.optimizer, self.loader = self.accelerator.prepare(model, optimizer, loader)
        self.total_steps = args.max_steps or max(1, math.ceil(args.epochs * len(self.loader) / args.grad_accum))
        from transformers import get_scheduler

        self.scheduler = get_scheduler(
            args.lr_scheduler, self.optimizer,
            num_warmup_steps=int(args.warmup_ratio * self.total_steps), num_training_steps=self.total_steps,
        )
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.share_prefix = self._can_share_prefix(model)

    # ------------------------------------------------------------ what methods override

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss(model, batch, sparse=self.args.sparse_logits, share_prefix=self.share_prefix)

    def training_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward, backward (gradients accumulate on the trainable parameters); returns the detached loss."""
        loss = self.compute_loss(self.model, batch)
        self.accelerator.backward(loss / self.args.grad_accum)
        return loss.detach()

    def on_step_start(self) -> None:
        """Called before each optimizer step (``self.step`` steps are done)."""

    def signals(self) -> dict[str, Any]:
        """The method's own per-step numbers for experiment trackers (e.g. Vaccine's perturbation norm)."""
        return {}

    def method_state(self) -> dict[str, Any]:
        """Extra state a method needs to resume bit for bit (e.g. T-Vaccine's layer scores)."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------ the loop

    def _can_share_prefix(self, model: torch.nn.Module) -> bool:
        """Prefix sharing is exact only without dropout (one mask would serve every row), without
        activation checkpointing (the replay would write the cache twice) and in one process; it is
        off with ``train.compile=layers`` (compiled layers and the prefix cache do not mix). It stays
        off for float64 models, which exist to check the math to float64 precision: sharing changes
        the logits in their last bits, and the float32 cross-entropy (transformers') would show it."""
        config = getattr(model, "config", None)
        rates = [v for k, v in (vars(config) if config is not None else {}).items()
                 if ("dropout" in k or "pdrop" in k) and isinstance(v, float)]
        dropout = any(r > 0 for r in rates) or any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
        checkpointing = bool(getattr(model, "is_gradient_checkpointing", False))
        float64 = any(p.dtype == torch.float64 for p in model.parameters())
        # compiled layers: the prefix cache makes every layer a new graph (a recompile per layer index,
        # then eager for all); measured, compiling pays more than sharing (benchmarks/throughput.py)
        compiled = self.args.compile == "layers" and self.compiles
        return (self.args.share_prefix and self.shares_prefix and not dropout and not checkpointing
                and not float64 and not compiled and self.accelerator.num_processes == 1)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        if self.args.optimizer == "sgd":
            return torch.optim.SGD(self.trainable, lr=self.args.learning_rate, weight_decay=self.args.weight_decay)
        return torch.optim.AdamW(self.trainable, lr=self.args.learning_rate, weight_decay=self.args.weight_decay)

    def batches(self):
        """Micro-batches from the resume point on, epoch after epoch, in a seed-determined order."""
        micro = self.step * self.args.grad_accum
        while True:
            epoch, skip = divmod(micro, len(self.loader))
            self.loader.set_epoch(epoch)
            loader = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
            for batch in loader:
                micro += 1
                yield batch

    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the forward passes autocast to: the base model's, when it is bfloat16/float16 and
        ``model.adapter_compute`` is ``model`` or ``auto`` (the float32 LoRA then computes in it; its
        weights, gradients and optimizer state stay float32), or, when every weight trains, the
        configured ``model.dtype`` where the weights were upcast to float32 master weights. None: no
        autocast."""
        if self.model_config.adapter_compute == "float32":
            return None
        base = next((p.dtype for p in self.unwrapped_model().parameters()
                     if not p.requires_grad and p.is_floating_point()), None)
        if base is None and self.model_config.dtype in ("bfloat16", "float16"):  # every weight trains:
            base = getattr(torch, self.model_config.dtype)  # float32 master weights of a half-precision model
        if base not in (torch.bfloat16, torch.float16):
            return None
        return base if any(p.dtype != base for p in self.trainable) else None

    @contextlib.contextmanager
    def autocast_forward(self):
        """While training, every forward of the model (the methods' extra passes included) runs under
        ``torch.autocast`` to ``autocast_dtype()``; backward and the optimizer step do not."""
        dtype = self.autocast_dtype()
        if dtype is None:
            yield
            return
        model, own = self.model, "forward" in vars(self.model)
        original = model.forward
        device = next(iter(self.trainable)).device.type
        model.forward = torch.autocast(device_type=device, dtype=dtype)(original)
        try:
            yield
        finally:
            if own:
                model.forward = original
            else:
                del model.forward

    def train(self) -> dict[str, Any]:
        with self.autocast_forward(), self.compiled_layers():
            return self._train()

    @contextlib.contextmanager
    def compiled_layers(self):
        """With ``train.compile``, every decoder layer (``layers``) or its MLP and norms (``mlp``) runs
        compiled (``nn.Module.compile``: inductor, dynamic shapes) while training; eager again
        afterwards, so generation and the other stages never see a compiled module."""
        if self.args.compile == "none":
            yield
            return
        if not self.compiles:
            log.info("train.compile: %s trains eagerly (it reaches inside the layers)", type(self).__name__)
            yield
            return
        layers = self.discover_layers().layers
        modules = list(layers) if self.args.compile == "layers" else [
            m for layer in layers for name, m in layer.named_children() if name == "mlp" or name.endswith("norm")]
        for module in modules:
            module.compile(dynamic=True)
        try:
            yield
        finally:
            for module in modules:
                module._compiled_call_impl = None  # what nn.Module.compile set: back to the eager forward

    def _train(self) -> dict[str, Any]:
        self._resume()
        start, t0 = self.step, time.perf_counter()
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, desc="train", unit="step")
        batches = self.batches()
        self.model.train()
        if self.tracking:
            self.tracking.start(self.accelerator)
        while self.step < self.total_steps:
            t_step = time.perf_counter()
            self.on_step_start()
            losses = []
            for i in range(self.args.grad_accum):
                last = i == self.args.grad_accum - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                    losses.append(self.training_step(next(batches)))
            if self.args.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.trainable, self.args.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            loss = self.accelerator.gather(torch.stack(losses).mean()).mean().item()
            self.history.append({"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0]})
            if self.tracking:
                from alignshield.tracking import scalars

                self.accelerator.log(scalars({"loss": loss, "lr": self.history[-1]["lr"],
                                              "step_seconds": time.perf_counter() - t_step, **self.signals()}),
                                     step=self.step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.step % self.args.checkpoint_every == 0 and self.step < self.total_steps:
                self._save_checkpoint()
        bar.close()
        elapsed = time.perf_counter() - t0
        return {
            "steps": self.total_steps,
            "steps_this_session": self.total_steps - start,
            "seconds_this_session": round(elapsed, 2),
            "seconds_per_step": round(elapsed / max(1, self.total_steps - start), 4),
            "final_loss": self.history[-1]["loss"] if self.history else None,
        }

    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def discover_layers(self) -> DecoderLayout:
        """The model's decoder layers and attention blocks (``model.decoder_layers`` /
        ``model.attention_module`` override the discovery); an error when none are found."""
        return discover(self.unwrapped_model(), self.model_config.decoder_layers, self.model_config.attention_module)

    # ------------------------------------------------------------ checkpoints

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.unwrapped_model().named_parameters())
        return {n: params[n].detach().cpu().clone() for n in self.trainable_names}

    def _save_checkpoint(self) -> None:
        if not self.accelerator.is_main_process or not self.resumable:
            return
        state = {
            "step": self.step,
            "trainable": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "method": self.method_state(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        path = self.workdir / CHECKPOINT
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        with (self.workdir / "train_log.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(h) + "\n" for h in self.history)

    def _resume(self) -> None:
        path = self.workdir / CHECKPOINT
        if not path.exists() or not self.resumable:
            return
        state = torch.load(path, weights_only=False)
        params = dict(self.unwrapped_model().named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = state["history"]
        self.load_method_state(state["method"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step = state["step"]
        log.info("resumed from %s at step %d of %d", path, self.step, self.total_steps)

    def finish(self) -> None:
        """Write the loss log; the checkpoint is no longer needed once the adapter is saved."""
        if self.tracking:
            self.accelerator.end_training()
        if self.accelerator.is_main_process:
            with (self.workdir / "train_log.jsonl").open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(h) + "\n" for h in self.history)
            (self.workdir / CHECKPOINT).unlink(missing_ok=True)
