"""What static decoding keeps across `generate` calls: the static buffers and the step captured on them.

Capturing a step costs a first eager step and the capture itself (tens of milliseconds at 7B), which a
benchmark's short answers (a word, 16 tokens) cannot pay back at every call. So a model keeps its last few
`Workspace`s (`WorkspacePool`, least recently used dropped first): the cache layers' static buffers, the step's
input buffers and its CUDA graph. The next `generate` whose compressed prompt fits a kept workspace loads its
state into those buffers in place (`StaticLayer.load`) and replays the graph at once.

To make prompts fit, buffers are padded as serving engines pad: the batch up to a power of two (extra rows
decode a copy of the first sample's token, attend only to themselves and are cut from the output), and each
layer's slots up to one of 8 sizes per octave (at most 1/8 of the slots unused, masked). A workspace is found by
its key: the padded sizes, the room (`max_new_tokens`), the method, the step's input layout and where the
weights live (a model whose weights were replaced since captures again).

Memory: each kept workspace holds its KV buffers (the padded size of the cache it last served) and its graph's
memory pool (the step's activations, small next to the KV). `DecodingOptions.kept_graphs` bounds how many
(default 4; 0 keeps none); `model.release_decoding_buffers()` frees them now, and they go with the model.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .static_layer import StaticLayer

# Step inputs with a batch dimension, and where it is (Qwen2-VL's M-RoPE `position_ids` are [3, b, 1]).
BATCHED_INPUTS = {"input_ids": 0, "inputs_embeds": 0, "position_ids": 0, "attention_mask": 0}
UNBATCHED_INPUTS = ("cache_position",)


def batch_bucket(batch: int) -> int:
    """`batch` rounded up to a power of two."""
    return 1 << (batch - 1).bit_length()


def slot_bucket(count: int) -> int:
    """`count` rounded up to one of 8 sizes per octave, at least 64."""
    if count <= 64:
        return 64
    step = 1 << (count.bit_length() - 4)
    return -(-count // step) * step


def batch_dim(name: str, tensor: torch.Tensor) -> int | None:
    """The batch dimension of a step input, None for one without (`cache_position`)."""
    if name in UNBATCHED_INPUTS:
        return None
    if name == "position_ids" and tensor.dim() == 3:
        return 1
    return BATCHED_INPUTS[name]


def paddable(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every step input is one whose batch dimension is known, so the batch can be padded."""
    return all(name in BATCHED_INPUTS or name in UNBATCHED_INPUTS for name in tensors)


def pad_batch(name: str, tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """`tensor` with rows up to `batch`, copies of its first row."""
    dim = batch_dim(name, tensor)
    if dim is None or tensor.shape[dim] == batch:
        return tensor
    index = torch.arange(batch, device=tensor.device)
    index[tensor.shape[dim]:] = 0
    return tensor.index_select(dim, index)


@dataclass(eq=False)
class Workspace:
    """One shape's static decoding state: layers, the step's scalars and input buffers, and its graph."""

    layers: list[StaticLayer]
    write_offset: torch.Tensor  # [1] the step within the room
    static_bases: torch.Tensor  # [layers] each layer's static_base
    batch: int  # rows of the buffers (the real batch, or its padded size)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # the step's tensor inputs, fixed buffers
    graph: torch.cuda.CUDAGraph | None = None
    graph_output: object = None

    @classmethod
    def allocate(cls, layers, room: int, batch: int, slot_sizes: list[int]) -> "Workspace":
        """Buffers for `layers` (compressed `CompressedLayer`s), `batch` rows, `slot_sizes[i]` slots before the
        room in layer i, holding their state."""
        write_offset = torch.zeros(1, dtype=torch.long, device=layers[0].keys.device)
        static = [StaticLayer.from_layer(layer, write_offset, room, batch, slots)
                  for layer, slots in zip(layers, slot_sizes)]
        workspace = cls(static, write_offset, torch.zeros(len(layers), dtype=torch.long, device=write_offset.device),
                        batch)
        workspace.set_bases()
        return workspace

    def fits(self, layers) -> bool:
        return len(layers) == len(self.layers) and all(s.fits(layer) for s, layer in zip(self.layers, layers))

    def load(self, layers) -> None:
        """Take a new prompt's compressed `layers` into these buffers, in place."""
        for static, layer in zip(self.layers, layers):
            static.load(layer)
        self.set_bases()

    def set_bases(self) -> None:
        bases = torch.tensor([layer.static_base for layer in self.layers])
        self.static_bases.copy_(bases, non_blocking=True)
        self.write_offset.zero_()

    def forget_graph(self) -> None:
        self.graph = self.graph_output = None


def weights_storage(module: torch.nn.Module) -> int:
    """Where `module`'s parameters and buffers live now. A tensor replaced since a step was captured (quantized or
    sparsified layers, a `.to()`, codes repacked for another kernel) would leave its graph reading freed memory,
    so a changed storage is a changed key."""
    return hash(tuple(tensor.data_ptr() for tensor in itertools.chain(module.parameters(), module.buffers())))


class WorkspacePool:
    """A model's kept workspaces, by key, least recently used dropped past `size`."""

    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict[tuple, Workspace] = OrderedDict()

    def key(self, layers, slot_sizes: list[int], room: int, batch: int, cache, step_inputs: dict[str, torch.Tensor],
            constants: dict, paths: tuple, weights: int):
        """What a workspace must match: sizes (padded: `slot_sizes`, `batch`), the room, the method, the step's
        input layout, `paths` (the decoding options the step was built with) and `weights` (`weights_storage`:
        a graph reads the weights where they were when it was captured)."""
        first = layers[0].keys
        sizes = tuple((layer.capacity is not None, layer.scores is not None, slots)
                      for layer, slots in zip(layers, slot_sizes))
        inputs = tuple(sorted((name, tensor.dtype, tuple(s for d, s in enumerate(tensor.shape)
                                                         if d != batch_dim(name, tensor)))
                              for name, tensor in step_inputs.items()))
        settings = tuple(sorted((name, repr(value)) for name, value in constants.items()
                                if value is None or isinstance(value, (bool, int, float, str))))
        return (first.device, first.dtype, first.shape[1], first.shape[3], batch, sizes, room, type(cache),
                cache.policy, inputs, settings, paths, weights)

    def take(self, key, layers) -> Workspace | None:
        """The workspace kept for `key` with `layers` loaded into it, or None."""
        workspace = self.entries.get(key)
        if workspace is None or not workspace.fits(layers):
            return None
        self.entries.move_to_end(key)
        workspace.load(layers)
        return workspace

    def keep(self, key, workspace: Workspace) -> None:
        if self.size < 1:
            return
        self.entries[key] = workspace
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def discard(self, workspace: Workspace) -> None:
        for key, kept in list(self.entries.items()):
            if kept is workspace:
                del self.entries[key]

