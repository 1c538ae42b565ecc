"""Finding the stack of repeated layers that megatrain streams."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from torch import nn

LayerClasses = Sequence["type[nn.Module] | str"]


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def resolve_classes(spec: LayerClasses) -> list[type[nn.Module] | str]:
    """Turn ``"pkg.mod.Class"`` into the class; a bare ``"Class"`` is matched by name."""
    out: list[type[nn.Module] | str] = []
    for item in spec:
        if isinstance(item, type):
            out.append(item)
            continue
        if not isinstance(item, str) or not item:
            raise TypeError(f"layer_cls entries must be classes or class names, got {item!r}")
        if "." in item:
            mod_name, _, cls_name = item.rpartition(".")
            try:
                out.append(getattr(importlib.import_module(mod_name), cls_name))
            except (ImportError, AttributeError) as err:
                raise ValueError(f"layer_cls entry {item!r} could not be imported: {err}") from err
        else:
            out.append(item)
    return out


def _matches(module: nn.Module, classes: list[type[nn.Module] | str]) -> bool:
    return any(type(module).__name__ == c if isinstance(c, str) else isinstance(module, c) for c in classes)


def find_layers(root: nn.Module, layer_cls: LayerClasses | None = None) -> list[nn.Module]:
    """The modules to stream, in call order.

    With ``layer_cls``: the outermost modules of those classes. Without: the children of the
    ``ModuleList``/``Sequential`` of two or more same-class children holding the most parameters.
    """
    if layer_cls:
        classes = resolve_classes(layer_cls)
        found: list[nn.Module] = []
        skip: set[int] = set()
        for module in root.modules():
            if id(module) in skip:
                continue
            if module is not root and _matches(module, classes):
                found.append(module)
                skip.update(id(m) for m in module.modules())
        if not found:
            names = [c if isinstance(c, str) else c.__qualname__ for c in classes]
            candidates = sorted({type(m).__name__ for m in root.modules() if _numel(m) > 0})
            raise ValueError(
                f"layer_cls={names} matches no module of {type(root).__name__}. Module classes with "
                f"parameters in this model: {candidates[:20]}. Pass one of them, or leave layer_cls unset "
                "to find the layer stack automatically."
            )
        return found

    best: list[nn.Module] = []
    best_numel = 0
    for module in root.modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.children())
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        numel = sum(_numel(c) for c in children)
        if numel > best_numel:
            best, best_numel = children, numel
    return best
