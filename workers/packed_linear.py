"""Linear layers with their weights reordered once for oneDNN: the CPU's verify forward.

Why: on a CPU, ``F.linear`` with a few rows reads the weights through MKL's sgemm, which
repacks them on every call. One row takes the fast GEMV path, so a verify forward of two to
nine rows cost 1.6-1.8x a one-row step of the same session (SmolLM2-135M, fp32, one thread:
55.8 ms for 1 row, 91.0 ms for 5), and every drafted token looked expensive next to
autoregressive decoding. With the weights reordered once into oneDNN's blocked layout (what
torch.compile's CPU freezing does: ``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise``), the same forward takes 55.8 ms for 1 row, 48.7 ms for 5 and 82.1 ms for
16 rows against 128.7 ms (``python -m bench.ragged_forward --prepack``, docs/benchmarks-history.md, session 15).
Every method on the server gains, AR included; extra rows gain most.

The outputs are the same linear map with another summation order (logits differ from
``F.linear``'s by about 1e-3 on the default target), as a one-row GEMV already differs from a
many-row GEMM today; acceptance stays decided by the verifier's own forward, so losslessness is
checked against the target decoding alone as before (tests/test_packed_linear.py and the
lossless tests).

Only float32 CPU weights with oneDNN present are packed; anything else keeps
``nn.Linear``. A packed module drops its dense weight unless the weight is tied to another module
(the default target's head shares the token embedding), so the server holds one copy.
"""

from __future__ import annotations

import functools

import structlog
import torch
from torch import nn

log = structlog.get_logger("sled.packed_linear")

PACKABLE_DTYPES = (torch.float32,)  # bfloat16 would need the CPU's AVX512-BF16; not measured here


class PackedLinear(nn.Module):
    """``x @ weight.T + bias`` over a oneDNN-reordered copy of ``weight`` [out, in] (inference only).
    ``dense``: a tied weight to keep reachable as ``.weight`` (``from_linear``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, dense: nn.Parameter | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.bias = None if bias is None else bias.detach()
        if dense is not None:  # tied: the other module holds it anyway
            self.weight = dense

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep_weight: bool = False) -> PackedLinear:
        return cls(linear.weight, linear.bias, linear.weight if keep_weight else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


@functools.cache
def available() -> bool:
    """oneDNN is built in and its linear ops answer (a CPU build of torch); probed once."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = nn.Linear(8, 4, bias=False)
        out = PackedLinear.from_linear(probe)(torch.ones(2, 8))
        return bool(torch.allclose(out, probe(torch.ones(2, 8)), atol=1e-5))
    except (RuntimeError, AttributeError):  # an op missing from this build
        return False


def prepack_linears(model: nn.Module) -> int:
    """Replace every float32 CPU ``nn.Linear`` of ``model`` by a ``PackedLinear``, in
    place; returns how many. Idempotent, and a no-op where oneDNN is missing or off the CPU."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype in PACKABLE_DTYPES]
    if not targets:
        return 0
    if not available():  # e.g. a torch whose oneDNN lacks these ops: nn.Linear as loaded, and say so
        log.warning("linears_not_prepacked", layers=len(targets), reason="oneDNN linear ops unavailable in this torch")
        return 0
    # weights used by more than one module (a head tied to the embedding) stay dense as well
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    with torch.inference_mode(False), torch.no_grad():
        for parent, name, child in targets:
            setattr(parent, name, PackedLinear.from_linear(child, keep_weight=owners.get(id(child.weight), 0) > 1))
    log.info("linears_prepacked", layers=len(targets), backend="oneDNN")
    return len(targets)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s weights, packed ones included (they are not parameters), each once."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(m.packed.numel() * m.packed.element_size() for m in model.modules() if isinstance(m, PackedLinear))
