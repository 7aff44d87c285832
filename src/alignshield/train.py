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
from alignshield.data.collate import PadCollator, Tokenized
from alignshield.models.layers import DecoderLayout, discover

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch, derived from (seed, epoch) alone, so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class Trainer:
    """Supervised fine-tuning of the model's trainable (LoRA) parameters on tokenized pairs."""

    Params = MethodParams
    trains = True
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
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])
        if self.accelerator.distributed_type == DistributedType.FSDP:
            # Checkpoints and the saved adapter are read from rank 0's parameters, which FSDP shards;
            # refuse rather than write a wrong adapter (docs/scale.md: use DDP or ZeRO-2).
            raise NotImplementedError("alignshield's LoRA trainer does not support FSDP yet (sharded parameters "
                                      "cannot be saved from rank 0); launch with multi_gpu.yaml (DDP) or zero2.yaml")
        # ZeRO shards the optimizer state per rank, so rank 0's checkpoint cannot resume the others:
        # under DeepSpeed an interrupted stage restarts from step 0 instead of resuming.
        self.resumable = self.accelerator.distributed_type != DistributedType.DEEPSPEED
        self.progress = progress and self.accelerator.is_main_process
        self.sampler = EpochSampler(len(train_set), seed)
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=self.sampler, collate_fn=self.collate)
        # names fixed now: methods may freeze some of them for a while (T-Vaccine), checkpoints keep all
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

    # ------------------------------------------------------------ what methods override

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def training_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward, backward (gradients accumulate on the trainable parameters); returns the detached loss."""
        loss = self.compute_loss(self.model, batch)
        self.accelerator.backward(loss / self.args.grad_accum)
        return loss.detach()

    def on_step_start(self) -> None:
        """Called before each optimizer step (``self.step`` steps are done)."""

    def method_state(self) -> dict[str, Any]:
        """Extra state a method needs to resume bit for bit (e.g. T-Vaccine's layer scores)."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------ the loop

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

    def train(self) -> dict[str, Any]:
        self._resume()
        start, t0 = self.step, time.perf_counter()
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, desc="train", unit="step")
        batches = self.batches()
        self.model.train()
        while self.step < self.total_steps:
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
        if self.accelerator.is_main_process:
            with (self.workdir / "train_log.jsonl").open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(h) + "\n" for h in self.history)
            (self.workdir / CHECKPOINT).unlink(missing_ok=True)
