"""Inference precision: fp32, bf16 autocast, or int8 encoder linear layers (dynamic quantisation).

``"int8"`` replaces every ``nn.Linear`` of the encoder of a *copy* of the module by
:class:`Int8DynamicLinear`: weights quantised once to int8 (symmetric, one scale per output
channel), activations quantised per call (one scale and zero point per batch, from the batch's
own range, i.e. dynamic quantisation), and the product computed by oneDNN's int8 matmul
(``torch.ops.onednn.qlinear_pointwise``, the x86 kernel that PyTorch's own Inductor int8 path
lowers to; VNNI/AMX instructions). Where the CPU computes bf16 natively, the query, key and
value leave the int8 projection in bf16, so the attention runs in bf16; everything else
(embeddings, norms, pooling, the cell head) stays float32. The copy shares every tensor but the quantised weights
with the user's module, is cached per module and rebuilt when its weights change.

Why not torchao: on this CPU (torch 2.13, eager mode) torchao 0.18's
``Int8DynamicActivationInt8WeightConfig`` ran a 768 x 3,072 linear layer *slower* than float32
(0.30 s against 0.18 s; it needs ``torch.compile`` to reach the int8 kernels), while the
oneDNN kernel ran it 2.8x faster than float32 with PyTorch's fused (but deprecated) activation
quantisation, ~1.8x with the plain arithmetic used here. The deprecated ``torch.ao.quantization`` API and
PyTorch's quantized tensors (deprecated as well) are not used: activations are quantised with
plain tensor arithmetic, which is what limits the speed-up (the int8 matmul is ~14x faster than
float32 on an AMX CPU, the per-batch quantisation of its input costs ~5x the matmul; see
``docs/performance.md``).
"""

from __future__ import annotations

import copy
import weakref
from typing import Literal

import torch
from torch import nn

Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS = ("fp32", "bf16", "int8")

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cpu_flag(name: str) -> bool | None:
    """``torch.cpu._is_<name>_supported()``, or ``None`` where this torch lacks the probe."""
    probe = getattr(torch.cpu, f"_is_{name}_supported", None)
    return None if probe is None else bool(probe())


def _cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - very old torch
        return "unknown"


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a ``precision`` that is unknown or that ``device``'s hardware cannot run.

    Raises
    ------
    ValueError
        If ``precision`` is not ``"fp32"``, ``"bf16"`` or ``"int8"``.
    RuntimeError
        bf16 on a CPU without AVX512-BF16 or AMX (or a GPU without bf16); int8 off the CPU, or
        on a CPU without oneDNN or VNNI/AMX int8 instructions.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'int8', not {precision!r}.")
    if precision == "fp32":
        return
    if precision == "bf16":
        if device.type == "cuda":
            if not torch.cuda.is_bf16_supported():
                raise RuntimeError(
                    "precision='bf16' needs a GPU with bfloat16 support (compute capability "
                    ">= 8.0); this one has none. Use precision='fp32'."
                )
            return
        if device.type == "cpu":
            native = (_cpu_flag("avx512_bf16"), _cpu_flag("amx_tile"))
            if native != (None, None) and not any(native):
                raise RuntimeError(
                    "precision='bf16' needs a CPU with native bfloat16 instructions "
                    "(AVX512-BF16 or AMX); this CPU has neither (torch CPU capability: "
                    f"{_cpu_capability()}), so bf16 would be emulated and slower than fp32. "
                    "Use precision='fp32' (or 'int8' where VNNI is available)."
                )
            return
        raise RuntimeError(f"precision='bf16' is supported on CPU and CUDA, not {device.type}.")
    # int8
    if device.type != "cpu":
        raise RuntimeError(
            f"precision='int8' runs on the CPU only (oneDNN int8 kernels); on {device.type} use "
            "precision='bf16', or pass device='cpu'."
        )
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.onednn, "qlinear_prepack"):
        raise RuntimeError(
            "precision='int8' needs PyTorch built with oneDNN (torch.backends.mkldnn); this "
            "build has none. Use precision='fp32' or 'bf16'."
        )
    int8 = (_cpu_flag("vnni"), _cpu_flag("amx_tile"))
    if int8 != (None, None) and not any(int8):
        raise RuntimeError(
            "precision='int8' needs a CPU with int8 dot-product instructions (AVX512-VNNI, "
            f"AVX-VNNI or AMX); this CPU has none (torch CPU capability: {_cpu_capability()}), "
            "so int8 would be slower than fp32. Use precision='fp32'."
        )


class Int8DynamicLinear(nn.Module):
    """A frozen ``nn.Linear`` with int8 weights and dynamically quantised int8 activations.

    Weights: symmetric int8, one scale per output channel, packed once for oneDNN.
    Activations: affine uint8 with one scale and zero point per call, from the input's own
    range (plain tensor arithmetic: PyTorch's quantized tensor type is deprecated and not
    used). Output and bias: float32. CPU only.

    Parameters
    ----------
    linear
        The layer to quantise; read, not modified.
    output_dtype
        ``torch.float32`` or ``torch.bfloat16`` (written directly by the int8 kernel).
    """

    def __init__(self, linear: nn.Linear, output_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.output_dtype = output_dtype
        weight = linear.weight.detach().float().cpu()
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        qweight = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self._packed = torch.ops.onednn.qlinear_prepack(qweight, None)
        self.register_buffer("weight_scale", scale.float(), persistent=False)
        self.register_buffer(
            "weight_zero_point", torch.zeros(self.out_features, dtype=torch.int32), persistent=False
        )
        bias = None if linear.bias is None else linear.bias.detach().float().cpu().clone()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` with int8 operands; ``x``: ``[..., in_features]`` float."""
        x = x.float().contiguous()
        lo, hi = torch.aminmax(x)
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)  # zero must be exact
        scale = max((hi - lo) / 255.0, 1e-12)
        zero_point = round(-lo / scale)
        # Round half up (values are >= 0 here) and clamp, then truncate to uint8.
        xq = torch.mul(x, 1.0 / scale).add_(zero_point + 0.5).clamp_(0.0, 255.0).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(
            xq, scale, zero_point, self._packed, self.weight_scale, self.weight_zero_point,
            self.bias, 1.0, 0, self.output_dtype, "none", [], "",
        )  # fmt: skip

    def extra_repr(self) -> str:
        """Sizes and output dtype, as ``print(module)`` shows them."""
        out = str(self.output_dtype).removeprefix("torch.")
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 -> {out}"


def _weights_key(module: nn.Module) -> tuple:
    """Identity and version of the encoder's linear weights: a change rebuilds the int8 copy."""
    return tuple(
        (m.weight.data_ptr(), m.weight._version)
        for m in module.encoder.modules()
        if isinstance(m, nn.Linear)
    )


def quantized_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose encoder linear layers are :class:`Int8DynamicLinear`.

    The copy shares every other tensor with ``module`` (nothing of ``module`` is changed or
    duplicated but the encoder's module objects); it is cached per module and rebuilt when the
    encoder's weights change (training, loading).
    """
    key = _weights_key(module)
    cached = _CACHE.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    # Deep-copy the encoder's module tree but share its tensors (memo), then swap the layers.
    memo = {id(t): t for t in list(module.encoder.parameters()) + list(module.encoder.buffers())}
    encoder = copy.deepcopy(module.encoder, memo)
    # The attention's query, key and value come out of the int8 projection in bf16 where the
    # CPU computes bf16 natively, so that the attention itself runs in bf16 too: at 1,500 genes
    # the fp32 attention was half of the int8 encoder's time.
    native_bf16 = bool(_cpu_flag("avx512_bf16") or _cpu_flag("amx_tile"))
    for parent in list(encoder.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                bf16 = native_bf16 and name == "qkv_proj"
                out = torch.bfloat16 if bf16 else torch.float32
                setattr(parent, name, Int8DynamicLinear(child, out))
    quantized = copy.copy(module)
    quantized._modules = dict(module._modules)  # a new dict: the user's module keeps its encoder
    quantized._parameters = dict(module._parameters)
    quantized._buffers = dict(module._buffers)
    quantized._modules["encoder"] = encoder.eval()
    quantized.eval()
    _CACHE[module] = (key, quantized)
    return quantized


def module_for_precision(
    module: nn.Module, precision: str, device: torch.device
) -> tuple[nn.Module, torch.dtype | None]:
    """The module to run and the autocast dtype (``None``: none) for ``precision`` on ``device``.

    Checks ``precision`` against the hardware first (:func:`check_precision`).
    """
    check_precision(precision, device)
    if precision == "int8":
        return quantized_copy(module), None
    return module, (torch.bfloat16 if precision == "bf16" else None)
