"""Find the decoder layers and their self-attention blocks of any causal LM, from its structure.

The reference code matched hard-coded class names, so models it did not know silently trained
without perturbation. Here discovery is structural (the stack of identical blocks whose length is
the config's layer count, then the attention child of each block), can be overridden in config
(``model.decoder_layers``, ``model.attention_module``), and raises when it finds nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention", "SelfAttention")


class LayerDiscoveryError(RuntimeError):
    pass


@dataclass
class DecoderLayout:
    layers_path: str
    attention_name: str
    layers: list[nn.Module]
    attentions: list[nn.Module]

    def __len__(self) -> int:
        return len(self.layers)


def _layer_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def find_decoder_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    modules = dict(model.named_modules())
    if path:
        matches = [name for name in modules if name == path or name.endswith("." + path)]
        if not matches or not isinstance(modules[matches[0]], nn.ModuleList):
            raise LayerDiscoveryError(
                f"{type(model).__name__}: model.decoder_layers={path!r} is not a module list in this model"
            )
        return matches[0], modules[matches[0]]
    expected = _layer_count(model)
    stacks = [
        (name, m) for name, m in modules.items()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(x) for x in m}) == 1
    ]
    if expected is not None:
        stacks = [(name, m) for name, m in stacks if len(m) == expected]
    # several stacks (e.g. a vision tower beside the text decoder): prefer the one holding attention
    stacks = [(name, m) for name, m in stacks if _attention_child(m[0]) is not None] or stacks
    if not stacks:
        raise LayerDiscoveryError(
            f"{type(model).__name__}: found no stack of {expected or 'identical'} decoder layers; "
            "set model.decoder_layers (e.g. model.layers)"
        )
    return min(stacks, key=lambda s: s[0].count("."))


def _attention_child(layer: nn.Module, name: str | None = None) -> tuple[str, nn.Module] | None:
    children = dict(layer.named_children())
    if name is not None:
        return (name, children[name]) if name in children else None
    for candidate in ATTENTION_NAMES:
        if candidate in children:
            return candidate, children[candidate]
    for child_name, child in children.items():
        if "attention" in type(child).__name__.lower() and "cross" not in child_name.lower():
            return child_name, child
    return None


def discover(model: nn.Module, decoder_layers: str | None = None, attention_module: str | None = None) -> DecoderLayout:
    """The decoder layers of ``model`` and the self-attention block of each; raises if any is missing."""
    path, layers = find_decoder_layers(model, decoder_layers)
    attentions, names = [], set()
    for i, layer in enumerate(layers):
        found = _attention_child(layer, attention_module)
        if found is None:
            raise LayerDiscoveryError(
                f"{type(model).__name__}: decoder layer {i} ({type(layer).__name__} at {path}) has no "
                f"self-attention child (looked for {attention_module or ', '.join(ATTENTION_NAMES)}); "
                f"its children are {', '.join(dict(layer.named_children()))}. Set model.attention_module."
            )
        names.add(found[0])
        attentions.append(found[1])
    return DecoderLayout(path, names.pop() if len(names) == 1 else ",".join(sorted(names)), list(layers), attentions)


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a DDP (``module``) and a PEFT (``get_base_model()``) wrapper, or the
    model itself when it has neither."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_argument(model: nn.Module) -> str:
    """The keyword a model's forward takes its key/value cache by: ``cache`` (transformers >= 5.x)
    or ``past_key_values`` (earlier)."""
    import inspect

    return "cache" if "cache" in inspect.signature(unwrapped(model).forward).parameters else "past_key_values"


def backbone(model: nn.Module) -> nn.Module:
    """The transformer under the output head (``base_model``: ``model`` for Llama, ``transformer`` for
    GPT-2 ...), through DDP and PEFT wrappers. (transformers 4.x's generic ``get_decoder`` returns None
    for the backbone of some models, so it is not used.)"""
    return unwrapped(model).base_model


def prefix_cache(model: nn.Module, prefix: torch.Tensor, batch_size: int):
    """The key/value cache of ``prefix`` (1 x P token ids), computed once by the model's decoder (no
    output head) and repeated ``batch_size`` times: what every row that starts with ``prefix`` would
    compute for it. Gradients flow through it when the caller trains."""
    decoder = backbone(model)
    out = decoder(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True)
    cache = getattr(out, cache_argument(decoder))
    cache.batch_repeat_interleave(batch_size)
    return cache


def attention_output(output) -> torch.Tensor:
    """The hidden-state tensor of an attention block's output (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def replace_attention_output(output, tensor: torch.Tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


@contextmanager
def add_to_attention_outputs(attentions: list[nn.Module], delta: Callable[[int, torch.Tensor], torch.Tensor]):
    """Inside the block, the output hidden states h of ``attentions[i]`` become h + delta(i, h).

    Forward hooks (not forked modeling code, not the deprecated module backward hooks), so any
    architecture whose attention block returns a tensor or a tuple led by one works.
    """

    def hook_for(i: int):
        def hook(module, args, output):
            h = attention_output(output)
            return replace_attention_output(output, h + delta(i, h))

        return hook

    handles = [module.register_forward_hook(hook_for(i)) for i, module in enumerate(attentions)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
