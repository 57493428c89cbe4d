"""Tensors derived from weights (``-exp(A_log)``, packed or transposed copies), made once at inference.

A forward at inference recomputes nothing that depends on the weights alone: each derived tensor is
kept beside the weight it came from until that weight changes (PyTorch's version counter, which every
in-place update bumps, or its storage, dtype or device) or is freed. A view of a weight (the
convolution's ``weight[:, 0, :]``, made anew at every call) is kept under the weight it views. Only for
inference: callers use ``cached`` where no autograd graph is recorded, so a cached tensor never needs
a gradient.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from torch import Tensor

# (id of the weight, what was derived, view geometry) -> (weak reference to the weight, its state, result)
_entries: dict[tuple, tuple[weakref.ref, tuple, Tensor]] = {}


def cached(weight: Tensor, kind: str, make: Callable[[Tensor], Tensor]) -> Tensor:
    """``make(weight)``, computed again only when ``weight`` has changed since the last call for ``kind``.

    Weights that keep no version counter (created under ``torch.inference_mode``) are not cached.
    """
    owner = weight if weight._base is None else weight._base
    try:
        state = (owner._version, owner.data_ptr(), owner.dtype, owner.device, owner.shape)
    except RuntimeError:  # an inference tensor
        return make(weight)
    key = (id(owner), kind, weight.shape, weight.stride(), weight.storage_offset())
    entry = _entries.get(key)
    if entry is not None and entry[0]() is owner and entry[1] == state:
        return entry[2]
    result = make(weight)

    def forget(dead: weakref.ref, key: tuple = key) -> None:
        if _entries.get(key, (None,))[0] is dead:  # not a newer weight that got the same id
            del _entries[key]

    _entries[key] = (weakref.ref(owner, forget), state, result)
    return result
