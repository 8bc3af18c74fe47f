"""L2 norms of many tensors in one call, accumulated in float32 on every supported torch."""

from __future__ import annotations

from typing import Any

# torch < 2.2 has no ``dtype`` argument to ``_foreach_norm``: there a float32 copy is reduced instead
# (found by trying: version strings of nightlies and local builds say too little).
_DTYPE_ARG = True


def foreach_norm(torch: Any, tensors: list[Any], all_float32: bool) -> Any:
    """``_foreach_norm(tensors, 2)``; half-precision tensors accumulate in float32 (their own dtype
    would overflow at 65504), float64 ones in float64. The tensors share one device."""
    global _DTYPE_ARG
    if all_float32:
        return torch._foreach_norm(tensors, 2)
    f32, halves = torch.float32, (torch.float16, torch.bfloat16)
    if not all(t.dtype is f32 or t.dtype in halves for t in tensors):
        # float64 and wider: in their own precision (a float32 norm of them is refused as narrowing);
        # a half tensor among them may overflow to inf, which the read re-checks exactly
        return torch._foreach_norm(tensors, 2)
    if _DTYPE_ARG:
        try:
            return torch._foreach_norm(tensors, 2, dtype=torch.float32)
        except TypeError:
            _DTYPE_ARG = False
    return torch._foreach_norm([t.float() for t in tensors], 2)
