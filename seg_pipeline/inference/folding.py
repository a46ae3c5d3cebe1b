"""Fold each eval-mode BatchNorm into the convolution that feeds it, for inference only.

An inference BatchNorm is an affine map per channel, so ``bn(conv(x))`` equals one convolution with
rescaled weights and a shifted bias (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`). Dropping
the BatchNorm pass made the bare Unet-resnet18 passes of ``bench/bench_predict.py`` 10-13 %
faster on a 2-core AMX CPU in bf16 (the script prints the figure for the machine it runs on).

Which convolution feeds which BatchNorm is read from a ``torch.fx`` trace, never guessed from the
order of the children: a pair is folded only when the convolution's one output goes straight into
the BatchNorm and each module is called once. Modules that fx cannot trace (SMP's models check
their input shape with Python ``if``) are searched child by child, and only leaf layers are
replaced, so every module keeps its own class, attributes and ``forward``. The folded copy is
checked against the model on one random input; if the outputs differ, the model runs as loaded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

#: Sides of the random input both models are compared on: the first the model takes (64 px costs
#: a few ms; PAN's pyramid needs 256).
CHECK_SIDES = (64, 256)


@dataclass(frozen=True)
class FoldedModel:
    """A model for inference and what folding did to it."""

    model: nn.Module
    folded: int
    batchnorms: int
    note: str


def _is_plain_batchnorm(module: nn.Module) -> bool:
    # Exact types: subclasses (timm's BatchNormAct2d, "same"-padding convolutions) do more in forward.
    return type(module) is nn.BatchNorm2d and module.track_running_stats and module.running_mean is not None


def _conv_batchnorm_pairs(module: nn.Module) -> list[tuple[str, str]] | None:
    """``(conv, batchnorm)`` submodule names that ``module``'s traced forward chains directly, or
    None when fx cannot trace ``module``.
    """
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # fx raises TraceError, TypeError, NotImplementedError... on untraceable code
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_plain_batchnorm(module.get_submodule(str(node.target))):
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        conv, batchnorm = str(source.target), str(node.target)
        if type(module.get_submodule(conv)) is not nn.Conv2d:
            continue
        if len(source.users) == 1 and calls[conv] == 1 and calls[batchnorm] == 1:
            pairs.append((conv, batchnorm))
    return pairs


def _fold_in_place(module: nn.Module) -> int:
    pairs = _conv_batchnorm_pairs(module)
    if pairs is None:
        return sum(_fold_in_place(child) for child in module.children())
    for conv, batchnorm in pairs:
        conv_module = module.get_submodule(conv)
        bn_module = module.get_submodule(batchnorm)
        assert isinstance(conv_module, nn.Conv2d) and isinstance(bn_module, nn.BatchNorm2d)
        module.set_submodule(conv, fuse_conv_bn_eval(conv_module, bn_module))
        module.set_submodule(batchnorm, nn.Identity())
    return len(pairs)


def _in_channels(model: nn.Module) -> int | None:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first is None else first.in_channels


def fold_batchnorm(model: nn.Module) -> FoldedModel:
    """An eval-mode copy of ``model`` with its conv -> BatchNorm pairs folded; ``model`` is untouched."""
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    if batchnorms == 0:
        return FoldedModel(model, 0, 0, "")
    folded_model = copy.deepcopy(model).eval()
    folded = _fold_in_place(folded_model)
    if folded == 0:
        return FoldedModel(model, 0, batchnorms, f"no BatchNorm of {batchnorms} could be folded")
    channels = _in_channels(model)
    if channels is None:
        return FoldedModel(model, 0, batchnorms, "batchnorm not folded: no convolution to take the input")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    error: Exception | None = None
    try:
        for side in CHECK_SIDES:
            x = torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(0)).to(device)
            try:
                with torch.inference_mode():
                    ref = _first_tensor(model.eval()(x))
                    out = _first_tensor(folded_model(x))
                break
            except Exception as failed:  # too small for this model: try the next side
                error = failed
        else:
            return FoldedModel(model, 0, batchnorms, f"batchnorm not folded: check pass failed ({error})")
    finally:
        model.train(was_training)
    tolerance = 1e-3 * (1.0 + float(ref.abs().max()))
    if ref.shape != out.shape or float((ref - out).abs().max()) > tolerance:
        return FoldedModel(model, 0, batchnorms, "batchnorm not folded: folded outputs differed")
    return FoldedModel(folded_model, folded, batchnorms, f"batchnorm folded {folded}/{batchnorms}")


def _first_tensor(output: object) -> torch.Tensor:
    """The logits of a model that returns a tensor or (logits, aux...) as SMP's ``aux_params`` does."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"model returned {type(output).__name__}, not a tensor")
