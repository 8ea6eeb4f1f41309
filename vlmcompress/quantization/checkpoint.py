"""The quantization report, and the `save_pretrained` / `load` round trip of a quantized model.

`save_pretrained` writes the model's tensors as they are held (`qweight`, `scales`, `zeros`, `input_scale` of
each quantized layer, in their stored form) and `quantization.json` beside them: the method, bits, group size
and each quantized layer's shape. `vlmcompress.load(folder)` sees that file and loads the model through a
subclass whose constructor puts empty `QuantizedLinear` modules where the file says, so `from_pretrained` fills
them from the checkpoint like any other tensors.
"""

from __future__ import annotations

import json
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .packing import QuantizedLinear

QUANT_FILE = "quantization.json"


@dataclass
class QuantizationReport:
    method: str
    bits: int
    group_size: int
    targets: tuple
    options: dict = field(default_factory=dict)
    num_samples: int = 0
    seconds: float = 0.0
    layers: dict = field(default_factory=dict)  # name -> shape, bias, input_scale?, original and quantized bytes

    def add_layer(self, name: str, linear: torch.nn.Linear, module: QuantizedLinear) -> None:
        self.layers[name] = {
            "in_features": module.in_features, "out_features": module.out_features, "bias": module.bias is not None,
            "input_scale": module.input_scale is not None,
            "original_bytes": linear.weight.numel() * linear.weight.element_size(),
            "quantized_bytes": module.weight_bytes(),
        }

    def memory_ratio(self) -> float:
        """Bytes of the quantized weights (codes, scales, zeros, input scales) over the original weights'."""
        return sum(l["quantized_bytes"] for l in self.layers.values()) / max(
            1, sum(l["original_bytes"] for l in self.layers.values()))

    def save(self, directory) -> None:
        Path(directory, QUANT_FILE).write_text(json.dumps(asdict(self), indent=1))

    def __str__(self) -> str:
        return (f"{self.method} W{self.bits} group {self.group_size}: {len(self.layers)} layers of "
                f"{', '.join(self.targets)}, {self.memory_ratio():.3f}x the original weight bytes, "
                f"{self.num_samples} calibration samples, {self.seconds:.1f} s")


def _save_pretrained_with_quantization(self, save_directory, *args, **kwargs):
    """`save_pretrained` of the model class, then `quantization.json` beside the weights."""
    out = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        self.quantization_report.save(save_directory)
    return out


_save_pretrained_with_quantization.__name__ = "save_pretrained"


def install_save_hook(model) -> None:
    if not isinstance(model.__dict__.get("save_pretrained"), types.MethodType):
        model.save_pretrained = types.MethodType(_save_pretrained_with_quantization, model)


def read_quantization(pretrained) -> dict | None:
    """The `quantization.json` of a local checkpoint folder, or None (not a folder, or not quantized)."""
    path = Path(str(pretrained)).expanduser() / QUANT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _report_of(info: dict) -> QuantizationReport:
    return QuantizationReport(info["method"], info["bits"], info["group_size"], tuple(info["targets"]),
                              info.get("options", {}), info.get("num_samples", 0), info.get("seconds", 0.0),
                              info["layers"])


def _replace_with_empty_modules(model, info: dict) -> None:
    for name, layer in info["layers"].items():
        linear = model.get_submodule(name)
        module = QuantizedLinear(layer["in_features"], layer["out_features"], info["group_size"], info["bits"],
                                 bias=layer["bias"], input_scale=layer["input_scale"], dtype=linear.weight.dtype,
                                 device=linear.weight.device)
        model.set_submodule(name, module)


def quantized_model_class(model_class, info: dict):
    """A subclass of `model_class` built with the saved model's `QuantizedLinear` modules in place, so that
    `from_pretrained` loads their tensors (through its own key mapping) like any other."""

    class Quantized(model_class):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            _replace_with_empty_modules(self, info)

    Quantized.__name__, Quantized.__qualname__ = model_class.__name__, model_class.__qualname__
    Quantized.__module__ = model_class.__module__
    return Quantized


def restored(model, info: dict):
    """`model` (from `quantized_model_class`) with its report and the `save_pretrained` that writes it."""
    model.quantization_report = _report_of(info)
    install_save_hook(model)
    return model
