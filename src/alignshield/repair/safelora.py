"""Safe LoRA: project fine-tune updates onto the alignment subspace (Hsu et al., NeurIPS 2024, arXiv 2405.16833).

For every LoRA module of the fine-tune adapter (two-lora topology: LoRA #2 on top of the merged
alignment LoRA #1), with its update dW = s * B @ A:

    V = W_aligned - W_base = s1 * B1 @ A1          (the same module's alignment LoRA #1 delta)
    C = V V^T / ||V||_F                            (the paper's "projection"; out x out)
    sim = cos(vec(C dW), vec(dW))

Modules with sim <= ``threshold`` (or, with ``num_proj_layers`` set, the that-many least similar ones)
get B <- C @ B, so the stored update is exactly C dW = s (C B) A at the same rank. Both the cosine and
C @ B are computed from the factors (``factor_similarity``, ``factor_projection``: rank x rank
products), equal to the dense formulas to float64 rounding; C itself (out x out: 11008^2 for a Llama-7B
MLP projection) is never formed. Modules whose
alignment LoRA is absent (V undefined) are left as they are and reported.

Deviation: the paper's V is the difference between an aligned chat model and its base (full
weights); here the aligned model is the base plus our alignment LoRA, so V is that LoRA's delta.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from alignshield.config import MethodParams
from alignshield.repair import REPAIR_METHODS
from alignshield.repair.prune import find_targets


class SafeLoRAParams(MethodParams):
    """Safe LoRA's settings. Reference (IBM/SafeLoRA, ``SafeLoRAConfig``): threshold 0.5 on the
    cosine similarity, or a fixed number of projected layers (``num_proj_layers``, 10 there)."""

    threshold: float = Field(0.5, ge=-1, le=1)
    """Project the modules whose cos(C dW, dW) is below this."""
    num_proj_layers: int | None = Field(None, gt=0)
    """When set, project exactly the this-many least similar modules instead (threshold ignored)."""
    target_modules: list[str] | None = None
    """Substrings of module names to consider; None = every LoRA module of the fine-tune adapter."""


def alignment_matrix(v: torch.Tensor) -> torch.Tensor:
    """C = V V^T / ||V||_F, in float64: the dense formula as the paper writes it. The repairs use the factor
    forms below (``factor_projection``), tested equal to it."""
    v = v.double()
    return v @ v.T / torch.linalg.norm(v)


def projection_similarity(c: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """cos(vec(C B A), vec(B A)) (the LoRA scale cancels), dense; the repairs use ``factor_similarity``."""
    dw = b.double() @ a.double()
    return float(torch.nn.functional.cosine_similarity((c @ dw).flatten(), dw.flatten(), dim=0))


def factor_similarity(p: torch.Tensor, q: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """``projection_similarity(alignment_matrix(p @ q), b, a)`` from the LoRA factors, never forming an
    out x out matrix: with V = P Q, G = Q Q^T, H = P^T B and M = G H (C B = P M / ||V||_F, a positive
    scale the cosine ignores), <C dW, dW> ∝ tr(M^T H AA^T), ||C dW||^2 ∝ tr(M^T P^T P M AA^T) and
    ||dW||^2 = tr(B^T B AA^T): rank x rank products only. 0.0 where either update is zero."""
    p, q, b, a = p.double(), q.double(), b.double(), a.double()
    h, aat = p.T @ b, a @ a.T
    m = (q @ q.T) @ h
    inner = torch.trace(m.T @ h @ aat)
    norms = torch.trace(m.T @ (p.T @ p) @ m @ aat) * torch.trace(b.T @ b @ aat)
    return float(inner / norms.sqrt()) if norms > 0 else 0.0


def factor_norm2(p: torch.Tensor, q: torch.Tensor) -> float:
    """||P Q||_F^2 = tr(P^T P Q Q^T), without forming P Q."""
    p, q = p.double(), q.double()
    return float(torch.trace((p.T @ p) @ (q @ q.T)))


def factor_projection(p: torch.Tensor, q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``alignment_matrix(p @ q) @ b`` (float64) from the factors: P (Q Q^T) (P^T B) / ||P Q||_F."""
    p, q, b = p.double(), q.double(), b.double()
    return p @ ((q @ q.T) @ (p.T @ b)) / max(factor_norm2(p, q), 0.0) ** 0.5


def alignment_lora(adapter: Path) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(s1, {module name inside the transformers model: (B1, A1)}) of a saved PEFT LoRA adapter, the
    factors in float64: the module's alignment delta V is s1 * B1 @ A1."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("use_rslora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{adapter}: the alignment adapter must be a plain LoRA (no rslora / rank_pattern)")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, a in weights.items():
        if key.endswith(".lora_A.weight"):
            name = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
            out[name] = (weights[key.replace(".lora_A.", ".lora_B.")].double(), a.double())
    return cfg["lora_alpha"] / cfg["r"], out


def alignment_factors(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (s1 * B1, A1)} of a saved PEFT LoRA adapter: V is their product."""
    scale, factors = alignment_lora(adapter)
    return {name: (scale * b, a) for name, (b, a) in factors.items()}


def require_alignment_lora(method: str, align_adapter: Path | None, topology: str) -> Path:
    """LoRA #1's folder for a repair that reads it beside the fine-tune LoRA (#2); a ValueError naming
    what is missing when the topology is not two-lora or the alignment trained no LoRA."""
    if topology != "two-lora":
        raise ValueError(f"{method} reads the alignment LoRA (#1) beside the fine-tune LoRA (#2): "
                         "it needs finetune.topology=two-lora")
    if align_adapter is None or not (Path(align_adapter) / "adapter_config.json").exists():
        raise ValueError(f"{method} needs the alignment stage's LoRA adapter (#1): an alignment that trains a "
                         "LoRA (align.method trained none)")
    return Path(align_adapter)


@REPAIR_METHODS.register("safelora")
class SafeLoRA:
    Params = SafeLoRAParams
    edits = True
    uses_alignment = True
    """The repair stage passes ``align_adapter`` (LoRA #1's folder) and ``topology``."""

    def repair(self, model, calibration, params: SafeLoRAParams, *, seed: int, pad_token_id: int | None = None,
               align_adapter: Path | None = None, topology: str = "two-lora") -> dict[str, Any]:
        factors = alignment_factors(require_alignment_lora("safelora", align_adapter, topology))
        targets, _ = find_targets(model, params.target_modules or [""])
        sims, skipped = {}, []
        for t in targets:
            p, q = factors.get(t.name, (None, None))  # V = P Q, LoRA #1's delta of this module
            b, a = t.factor("lora_B").weight, t.factor("lora_A").weight
            if p is None or (p.shape[0], q.shape[1]) != (b.shape[0], a.shape[1]) or not factor_norm2(p, q) > 0:
                skipped.append(t.name)
                continue
            sims[t.name] = factor_similarity(p, q, b, a)
        if params.num_proj_layers is not None:
            chosen = set(sorted(sims, key=sims.get)[: params.num_proj_layers])
        else:
            chosen = {n for n, s in sims.items() if s <= params.threshold}  # the reference: cos <= threshold
        with torch.no_grad():
            for t in targets:
                if t.name in chosen:
                    b = t.factor("lora_B").weight
                    p, q = (f.to(b.device) for f in factors[t.name])
                    b.copy_(factor_projection(p, q, b).to(b.dtype))
        return {"projected": sorted(chosen), "n_projected": len(chosen), "n_modules": len(targets),
                "skipped_no_alignment_lora": skipped, "similarity": {n: round(s, 6) for n, s in sims.items()}}
