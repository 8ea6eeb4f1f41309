"""`QuantizedLinear`: a Linear layer whose weight is held as packed 4-bit codes, and its matrix products.

Stored form (what `state_dict`, `save_pretrained` and checkpoints hold, on any device):

* `qweight`  uint8 `[out, in / 2]`: two codes a byte, column 2j in the high nibble and 2j+1 in the low one
  (the input of PyTorch's `_convert_weight_to_int4pack`);
* `scales`   `[out, in / group]` in the model's dtype, and `zeros` uint8 `[out, in / group]`: a weight reads
  back as `(q - zero) * scale`;
* `input_scale` (AWQ only) `[in]`: the input is multiplied by it before the product (the inverse of the
  per-channel scale AWQ folded into the weight);
* `bias` when the Linear had one.

Products. On CUDA, by default, PyTorch's tinygemm (`torch.ops.aten._weight_int4pack_mm`, bfloat16) for up to
`kernels.MAX_PRODUCT_ROWS` rows, and on the CPU `_weight_int4pack_mm_for_cpu` (bfloat16), which read `(q - 8) *
scale + offset` with `offset = (8 - zero) * scale` from codes repacked into their layout on the first product, in
place of `qweight` (no second copy is kept); `state_dict` and moving the module to another device turn them back
into the stored form exactly. A prompt's rows on CUDA go to cuBLAS, the weight dequantized from tinygemm's tiles
(`kernels.tinygemm_tile_order`). `QuantizedLinear.cuda_kernel = "triton"` (the class, or one layer) puts CUDA
bfloat16 and float16 layers on our triton kernels (`kernels`) instead, which read the stored form as it is: a
product with up to 64 rows (decoding) in one kernel, more rows (prefill) by dequantizing the weight for cuBLAS.
On an H100 they decode slower than tinygemm (docs/quantization.md, "Speed (GPU)"). Where no kernel takes the
layer (float32, float16 without the triton kernels, widths the kernels do not tile), the weight is dequantized
for each product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .base import dequantize_groups

PLAIN, CUDA_TILED, CPU_PACKED = "plain", "cuda", "cpu"
# output rows a kernel's layout packs together (tinygemm: tiles of 8 rows; the CPU kernel: blocks of 64): layers
# whose widths are whole blocks concatenate their packed codes into the packing of the concatenated codes
PACKED_ROWS = {CUDA_TILED: kernels.TILE_ROWS, CPU_PACKED: 64}


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [out, in] (values 0..15, in even) -> [out, in / 2], column 2j in the high nibble, row-major
    (the kernels step through a row's bytes; codes read back from a kernel's layout come transposed)."""
    codes = codes.to(torch.uint8)
    return ((codes[:, 0::2] << 4) | codes[:, 1::2]).contiguous()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_codes`."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)


def _inner_k_tiles(in_features: int) -> int | None:
    return next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), None)


class QuantizedLinear(nn.Module):
    """`y = (x * input_scale) @ dequant(W)^T + bias` with W held as 4-bit codes (see the module docstring)."""

    cuda_kernel = "tinygemm"  # CUDA products: "tinygemm" (PyTorch's, repacked) or "triton" (ours, on the stored form)

    def __init__(self, in_features: int, out_features: int, group_size: int, bits: int, bias: bool = False,
                 input_scale: bool = False, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size, self.bits = in_features, out_features, group_size, bits
        self.layout = PLAIN
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.register_buffer("input_scale", torch.ones(in_features, dtype=dtype, device=device) if input_scale else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.register_buffer("scale_and_offset", None, persistent=False)  # the kernels' [in/group, out, 2]
        self._register_state_dict_hook(_stored_form_in_state_dict)

    @classmethod
    def from_codes(cls, linear: nn.Linear, codes, scales, zeros, bits: int, input_scale=None) -> "QuantizedLinear":
        """The quantized replacement of `linear` from codes [out, in], scales and zeros [out, in / group]."""
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.in_features // scales.shape[1], bits,
                     bias=linear.bias is not None, input_scale=input_scale is not None, dtype=weight.dtype,
                     device=weight.device)
        module.qweight.copy_(pack_codes(codes))
        module.scales.copy_(scales)
        module.zeros.copy_(zeros.round().to(torch.uint8))
        if input_scale is not None:
            module.input_scale.copy_(input_scale)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.data)
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, awq={self.input_scale is not None}, "
                f"layout={self.layout}")

    # ----------------------------------------------------------------------------------------- stored form

    def codes(self) -> torch.Tensor:
        """The integer codes [out, in] (uint8), whatever layout `qweight` is in now."""
        if self.layout == PLAIN:
            return unpack_codes(self.qweight)
        # one product with the identity, scale 1 and offset 8, reads each code back exactly: (q - 8) * 1 + 8 = q
        dtype = self.scale_and_offset.dtype
        unit = torch.stack([torch.ones_like(self.scale_and_offset[..., 0]),
                            torch.full_like(self.scale_and_offset[..., 0], 8)], dim=-1)
        rows = []
        for start in range(0, self.in_features, 1024):
            count = min(1024, self.in_features - start)
            eye = torch.zeros(count, self.in_features, dtype=dtype, device=self.qweight.device)
            eye[torch.arange(count), start + torch.arange(count)] = 1
            rows.append(self._kernel(eye, unit))
        return torch.cat(rows).t().round().to(torch.uint8)

    def weight_bytes(self) -> int:
        """Bytes held for the weight: every buffer (codes, scales, zeros, the kernel's scales, the input scale)."""
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the codes stand for, float32 [out, in] (the input scale not applied)."""
        return dequantize_groups(self.codes(), self.scales, self.zeros)

    def _to_plain(self) -> None:
        if self.layout != PLAIN:
            self.qweight = pack_codes(self.codes())
            self.scale_and_offset, self.layout = None, PLAIN

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .half(): from the stored form
        self._to_plain()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._to_plain()
        return super()._load_from_state_dict(*args, **kwargs)

    # ----------------------------------------------------------------------------------------- products

    def kernel_layout(self, out_features: int | None = None) -> str | None:
        """The layout of the int4 kernel that repacks this layer's codes on its current device and dtype (CPU
        bfloat16; CUDA bfloat16 when `cuda_kernel` is "tinygemm"), or None where products read the stored form.
        `out_features`: for a layer as this one but of that output width (fused ones)."""
        device, dtype = self.scales.device, self.scales.dtype
        out_features = out_features or self.out_features
        if device.type == "cuda" and self.cuda_kernel == "tinygemm" and dtype == torch.bfloat16 \
                and out_features % 8 == 0 and _inner_k_tiles(self.in_features):
            return CUDA_TILED
        # float32 has a CPU kernel too, but one slower than dequantizing: bfloat16 only
        if device.type == "cpu" and dtype == torch.bfloat16 and out_features % 16 == 0:
            return CPU_PACKED
        return None

    def _take_layout(self, layout: str | None) -> None:
        """The codes in `layout`: a kernel's, or (None) the stored form."""
        if self.layout != (layout or PLAIN):
            self._to_plain()
            if layout is not None:
                self._to_kernel_layout(layout)

    def _to_kernel_layout(self, layout: str) -> None:
        if layout == CUDA_TILED:
            tiled = torch.ops.aten._convert_weight_to_int4pack(self.qweight.contiguous(), _inner_k_tiles(self.in_features))
        else:
            tiled = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_codes(self.qweight).to(torch.int32), 1)
        scales = self.scales.float()
        offset = (8 - self.zeros.float()) * scales
        self.scale_and_offset = torch.stack([scales, offset], dim=-1).transpose(0, 1).contiguous().to(self.scales.dtype)
        self.qweight, self.layout = tiled, layout

    def _kernel(self, x2d: torch.Tensor, scale_and_offset: torch.Tensor) -> torch.Tensor:
        if self.layout == CUDA_TILED:
            return torch.ops.aten._weight_int4pack_mm(x2d, self.qweight, self.group_size, scale_and_offset)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.qweight, self.group_size, scale_and_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        self._take_layout(self.kernel_layout())  # the first product, or `cuda_kernel` switched since, repacks
        if self.layout != PLAIN and x.dtype == self.scale_and_offset.dtype:
            x2d = x.reshape(-1, self.in_features).contiguous()  # packed rows: a batch's last tokens are strided
            # a prompt: tinygemm is made for few rows (25x slower than cuBLAS in bf16 at 2408 rows on an H100,
            # bench/results/quant_kernels_h100.json), so its codes are dequantized for cuBLAS, as triton's are
            if self.layout == CUDA_TILED and x2d.shape[0] > kernels.MAX_PRODUCT_ROWS and (
                    order := kernels.tinygemm_tile_order(x.device, _inner_k_tiles(self.in_features))) is not None:
                weight = kernels.dequantize(self.qweight, self.scales, self.zeros, self.group_size, order)
                return F.linear(x, weight, self.bias)
            out = self._kernel(x2d, self.scale_and_offset)
            out = out.reshape(*x.shape[:-1], self.out_features)
            return out + self.bias if self.bias is not None else out
        if self.layout == PLAIN and self.cuda_kernel == "triton" and kernels.takes(x, self.scales, self.group_size):
            return kernels.quantized_linear(x, self.qweight, self.scales, self.zeros, self.bias, self.group_size)
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


def fuse_quantized_linears(layers: list[QuantizedLinear]) -> QuantizedLinear | None:
    """One QuantizedLinear computing all of `layers` (outputs concatenated) over buffers whose consecutive rows
    are the layers' own `qweight`, `scales`, `zeros` and biases: the first call moves them into one buffer each,
    of which the layers keep views (no second copy, as `fuse_linears` does for Linears); later calls find them
    there. None unless the layers read one input alike: the same input width, group size, bits, dtype and
    device, no input scale (AWQ's is each layer's own), all or none with a bias, and one kernel layout for them
    and the fused layer. In a kernel's layout (tinygemm's, the CPU's) the codes are packed by blocks of output
    rows (`PACKED_ROWS`), so layers whose widths are whole blocks have their packed codes fused the same way;
    the kernel's scale-and-offset table, [in / group, out, 2], is concatenated into a table of the fused
    layer's own (a copy: 1/16 of the codes' bytes at 4 bits).
    """
    from ..decoding.step_kernels import fused_rows  # the decoding package imports this module

    first, out_features = layers[0], sum(layer.out_features for layer in layers)
    layout = first.kernel_layout(out_features)
    alike = {(layer.in_features, layer.group_size, layer.bits, layer.scales.dtype, layer.scales.device,
              layer.bias is None) for layer in layers}
    if not (len(alike) == 1 and first.scales.device.type != "meta"
            and all(layer.input_scale is None and layer.kernel_layout() == layout and not hasattr(layer, "_hf_hook")
                    and layer.out_features % PACKED_ROWS.get(layout, 1) == 0 for layer in layers)):
        return None
    # tinygemm's tiles follow each other row by row where its probe says so (as on the H100): else no fusing
    if layout == CUDA_TILED and kernels.tinygemm_tile_order(first.scales.device,
                                                           _inner_k_tiles(first.in_features)) is None:
        return None
    for layer in layers:  # each in the layout the fused product reads (an earlier `cuda_kernel` may have left another)
        layer._take_layout(layout)
    fused = QuantizedLinear(first.in_features, out_features, first.group_size, first.bits,
                            bias=first.bias is not None, dtype=first.scales.dtype, device="meta")
    fused.qweight, fused.scales, fused.zeros = (fused_rows(layers, name) for name in ("qweight", "scales", "zeros"))
    if layout is not None:
        fused.scale_and_offset = torch.cat([layer.scale_and_offset for layer in layers], dim=1)
        fused.layout = layout
    if first.bias is not None:
        fused.bias = nn.Parameter(fused_rows(layers, "bias"), requires_grad=False)
    return fused


def _stored_form_in_state_dict(module: QuantizedLinear, state_dict, prefix, local_metadata):
    if module.layout != PLAIN:
        state_dict[prefix + "qweight"] = pack_codes(module.codes())
    return state_dict
