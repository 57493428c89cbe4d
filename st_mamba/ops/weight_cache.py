"""Tensors derived from weights (``-exp(A_log)``, packed or transposed copies), made once at inference.

A forward at inference recomputes nothing that depends on the weights alone: each derived tensor is
kept beside the weight it came from until that weight changes (PyTorch's version counter, which every
in-place update bumps, or its storage, dtype or device) or is freed. A view of a weight (the
convolution's ``weight[:, 0, :]``, made anew at every call) is kept under the weight it views. Only for
inference: callers use ``cached`` where no autograd graph is recorded, so a cached tensor never needs
a gradient. While a CUDA graph is being captured (``capturing``, set by ``st_mamba.cuda_graphs``) nothing
new is stored: a tensor made then holds its values only once the graph is replayed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

from torch import Tensor

# (id of the weight, what was derived, view geometry) -> (weak reference to the weight, its state, result)
_entries: dict[tuple, tuple[weakref.ref, tuple, Tensor]] = {}
capturing = 0  # > 0 while a CUDA graph is being captured


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
    if capturing:
        return result

    # ``entries`` bound now: at interpreter exit the module's globals may be gone before the last weights.
    def forget(dead: weakref.ref, key: tuple = key, entries: dict = _entries) -> None:
        if entries.get(key, (None,))[0] is dead:  # not a newer weight that got the same id
            del entries[key]

    _entries[key] = (weakref.ref(owner, forget), state, result)
    return result


def derived_from(weights: Iterable[Tensor]) -> list[Tensor]:
    """Every tensor now cached for one of ``weights`` (for a CUDA graph that reads them to keep them alive)."""
    owners = {id(weight if weight._base is None else weight._base) for weight in weights}
    return [entry[2] for key, entry in list(_entries.items()) if key[0] in owners and entry[0]() is not None]
