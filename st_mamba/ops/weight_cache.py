"""Tensors derived from weights (``-exp(A_log)``, packed or transposed copies), made once at inference.

A forward at inference recomputes nothing that depends on the weights alone: each derived tensor is
kept beside the weight it came from until that weight changes (PyTorch's version counter, which every
in-place update bumps, or its storage) or is freed. Only for inference: callers use ``cached`` where
no autograd graph is recorded, so a cached tensor never needs a gradient.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from torch import Tensor

# (id of the weight, what was derived) -> (weak reference to the weight, its version, its data pointer, result)
_entries: dict[tuple[int, str], tuple[weakref.ref, int, int, Tensor]] = {}


def cached(weight: Tensor, kind: str, make: Callable[[Tensor], Tensor]) -> Tensor:
    """``make(weight)``, computed again only when ``weight`` has changed since the last call for ``kind``.

    Weights that keep no version counter (created under ``torch.inference_mode``) are not cached.
    """
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor
        return make(weight)
    key = (id(weight), kind)
    entry = _entries.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == version and entry[2] == weight.data_ptr():
        return entry[3]
    result = make(weight)

    def forget(dead: weakref.ref, key: tuple[int, str] = key) -> None:
        if _entries.get(key, (None,))[0] is dead:  # not a newer weight that got the same id
            del _entries[key]

    _entries[key] = (weakref.ref(weight, forget), version, weight.data_ptr(), result)
    return result
