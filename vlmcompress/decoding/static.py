"""Static decoding: once the prompt is compressed, each decoding step runs at fixed shapes, from a CUDA graph.

Eager `generate` is launch-bound while decoding: a 7B model's step is some thousand kernel launches from
Python, so it costs the same whatever the cache holds, and a smaller cache cannot show (docs/benchmarks.md,
"How decoding is made fast"). Nothing in a step needs the host once the prompt is compressed:

- every cache layer becomes a `StaticLayer` with preallocated room for the coming tokens; step t writes its
  key and value at slot `static_base + t`, with t held in a device scalar, and marks the slot valid;
- a layer of a method that evicts while decoding (H2O, StreamingLLM) holds its capacity and one slot more,
  as eager decoding at the budget does: step t writes into the slot in a device buffer (`free_slot`), and
  after the attention its eviction picks the next one with tensor operations (`StaticLayer.retire`):
  the lowest-scored live slot of a row over its capacity, else an empty one;
- the attention masks the layer's padding and unfilled room (`StaticLayer.decode_mask`);
- the language model's per-step inputs (embeddings, positions) are copied into fixed buffers.

So a step is the same kernels on the same buffers every time. On CUDA the first step runs eagerly and
is captured as a graph; each later step is a few small copies into its input buffers and one replay. On the
CPU the same static step runs eagerly, which is what the tests compare with eager decoding. When the room runs out (more
new tokens than `room`), the layers get more and the step is captured again. The static layers, input buffers
and graph stay with the model for later `generate` calls whose compressed prompts fit them (`workspace`).

Every eviction cache decodes statically (and `FullCache` for the uncompressed baseline); flash-attention
cannot take the mask, SDPA and eager can.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect

import torch
import transformers.generation.utils as generation_utils

from ..compilation import compile_by_default
from ..glue import passed_cache
from .options import DecodingOptions
from .static_layer import slots_needed
from .step_kernels import StepKernels
from .workspace import Workspace, WorkspacePool, batch_bucket, pad_batch, paddable, slot_bucket, weights_storage

ROOM = 256  # decoding steps one static allocation serves when generate's max_new_tokens is unknown
DEFERRED_DEVICES = ("cuda",)  # where transformers' DeferredStopCheck works: it records device events
CACHE_FIELDS = ("past_key_values", "cache")  # the cache's field in a model output (renamed in transformers 5.2x)


class StaticDecoding:
    """Runs `language_model`'s decoding calls with `cache` (a `CompressedCache`) statically (see the module
    docstring).

    Installed as the instance's `forward` for one `generate` (`install` / `close`); every other call
    (the prompt, a different cache, several new tokens at once) goes to the upstream forward unchanged. With a
    `WorkspacePool` (the model's), its buffers and graph come from, and stay for, other `generate` calls.
    """

    def __init__(self, cache, language_model: torch.nn.Module, room: int = ROOM,
                 use_graphs: bool | None = None, options: DecodingOptions = DecodingOptions(),
                 compile_kernels: bool | None = None, workspaces: WorkspacePool | None = None):
        if room < 1:
            raise ValueError(f"room must be >= 1 decoding step, got {room}")
        self.cache, self.language_model, self.room = cache, language_model, room
        self.upstream_forward = type(language_model).forward.__get__(language_model)
        self.takes_cache_position = "cache_position" in inspect.signature(self.upstream_forward).parameters
        device = next(language_model.parameters()).device
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        if compile_kernels is None:  # compiled where the steps replay from a graph
            compile_kernels = self.use_graphs and options.compile and compile_by_default(device)
        self.step_kernels = StepKernels(language_model, compile=compile_kernels, fuse_products=options.fuse_products)
        # what a captured step depends on besides the shapes: a kept graph serves only the same switches
        self.paths = (options, compile_kernels)
        self.workspaces = workspaces
        self.workspace: Workspace | None = None
        self.batch = 0  # the real batch; the workspace's may be padded
        self.steps_written = 0
        self.captures = 0  # graphs captured during this generate
        self.reused = False  # whether this generate's steps replayed a graph captured by an earlier one

    def install(self) -> "StaticDecoding":
        self.language_model.forward = self
        self.cache.static_decoding = self
        return self

    def close(self) -> None:
        vars(self.language_model).pop("forward", None)
        self.cache.static_decoding = None
        if self.workspace is not None:  # the cache may serve a next turn: give it back a dynamic copy
            layers = self.cache.layers
            for index, layer in enumerate(layers):
                layers[index] = layer.to_dynamic(layer.static_base + self.steps_written, self.batch)
            self.workspace = None

    def undo_steps(self, steps: int) -> None:
        """Forget the last `steps` decoding steps: their slots are masked again and the positions go back.
        `generate`'s deferred stop check runs one step past the end and undoes it (`CompressedCache.crop`)."""
        if not 0 <= steps <= self.steps_written:
            raise NotImplementedError(f"static decoding can undo at most the {self.steps_written} steps written "
                                      f"since its room was last made, not {steps}")
        self.steps_written -= steps
        for layer in self.cache.layers:
            layer.undo_steps(self.steps_written, steps)

    def __call__(self, *args, **kwargs):
        embeds = kwargs.get("inputs_embeds")
        new = (embeds if embeds is not None else kwargs.get("input_ids"))
        decoding = (not args and passed_cache(kwargs) is self.cache and new is not None and new.shape[1] == 1
                    and self.cache.layers and all(layer.compressed for layer in self.cache.layers))
        if not decoding:
            return self.upstream_forward(*args, **kwargs)
        return self.decode_step(kwargs)

    # ----- one step --------------------------------------------------------------------------------
    def decode_step(self, kwargs: dict):
        tensors, constants = self._split_inputs(kwargs)
        if self.workspace is None:
            self._bind_workspace(tensors, constants)
        elif self.steps_written == self.room:
            self._grow_room()
        workspace = self.workspace
        tensors = {name: pad_batch(name, tensor, workspace.batch) for name, tensor in tensors.items()}
        shapes_changed = {k: (v.shape, v.dtype) for k, v in tensors.items()} != {
            k: (v.shape, v.dtype) for k, v in workspace.inputs.items()}
        workspace.write_offset.fill_(self.steps_written)
        if workspace.graph is not None and not shapes_changed:
            for name, tensor in tensors.items():
                workspace.inputs[name].copy_(tensor)
            workspace.graph.replay()
            output = workspace.graph_output
        else:
            workspace.inputs = {name: tensor.clone() for name, tensor in tensors.items()}
            output = self._run(constants)
        self.steps_written += 1
        for layer in self.cache.layers:
            layer.seen_tokens += 1  # what the model's positions come from; the static writes leave it alone
        return self._unpadded(output)

    def _bind_workspace(self, tensors: dict, constants: dict) -> None:
        """Put the compressed prompt into static buffers: a kept workspace's where one fits, else new ones. The
        unfilled room is masked at every step, so the cache's mask hooks come back."""
        layers = self.cache.layers
        self.batch = layers[0].keys.shape[0]
        pool = self.workspaces
        if pool is None:
            self.workspace = Workspace.allocate(layers, self.room, self.batch, [slots_needed(x) for x in layers])
        else:
            batch = batch_bucket(self.batch) if paddable(tensors) else self.batch
            sizes = [slot_bucket(slots_needed(layer)) for layer in layers]
            key = pool.key(layers, sizes, self.room, batch, self.cache, tensors, constants, self.paths,
                           weights_storage(self.language_model))
            self.workspace = pool.take(key, layers)
            self.reused = self.workspace is not None and self.workspace.graph is not None
            if self.workspace is None:
                self.workspace = Workspace.allocate(layers, self.room, batch, sizes)
                pool.keep(key, self.workspace)
        self.cache.layers[:] = self.workspace.layers
        self.cache.keep_mask_hooks()
        self.steps_written = 0

    def _grow_room(self) -> None:
        """The room ran out: every layer gets `room` more slots, keeping the tokens written since its room was
        last made. The buffers are new, so the workspace is no longer kept, and the next step is captured again."""
        workspace = self.workspace
        for layer in workspace.layers:
            layer.make_room(layer.static_base + self.steps_written, self.room)
        if self.workspaces is not None:
            self.workspaces.discard(workspace)
        workspace.set_bases()
        workspace.forget_graph()
        self.steps_written = 0

    def _unpadded(self, output):
        """The step's output for this `generate`: the padding rows cut, and its own cache (a replayed graph's
        output holds none: a kept graph must not keep the cache it was captured with alive)."""
        fields = {name: value for name, value in output.items() if name not in CACHE_FIELDS}
        if self.workspace.batch != self.batch:
            fields = {name: value[: self.batch] if isinstance(value, torch.Tensor) else value
                      for name, value in fields.items()}
        fields.update({field.name: self.cache for field in dataclasses.fields(output) if field.name in CACHE_FIELDS})
        return type(output)(**fields)

    def _split_inputs(self, kwargs: dict) -> tuple[dict, dict]:
        """The step's tensors (copied into fixed buffers) and the rest (constant across steps). Positions
        the model would derive from the cache's host-side length are computed here, outside the graph."""
        seen = self.cache.get_seq_length()
        kwargs = dict(kwargs)
        device = self.cache.layers[0].keys.device
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = torch.full((1, 1), seen, dtype=torch.long, device=device)
        if self.takes_cache_position and kwargs.get("cache_position") is None:
            kwargs["cache_position"] = torch.full((1,), seen, dtype=torch.long, device=device)
        # Every attention layer gets the cache's static mask; without a padding mask the model builds none
        # for one new token (SDPA) and reads no mask values on the host, which a capture forbids.
        kwargs["attention_mask"] = None
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        constants = {k: v for k, v in kwargs.items() if k not in tensors}
        return tensors, constants

    def _step(self, constants: dict):
        # Before the attention, each layer's slot for this step becomes valid (the new token attends to itself);
        # the slots (`static_base + write_offset`) are added up for all layers in one kernel.
        workspace = self.workspace
        slots = workspace.static_bases + workspace.write_offset
        for index, layer in enumerate(self.cache.layers):
            layer.start_step(slots[index: index + 1])
        with self.step_kernels:
            return self.upstream_forward(**constants, **workspace.inputs)

    def _run(self, constants: dict):
        """This step, eagerly; on CUDA (unless `use_graphs=False`) also captured for the steps after it."""
        if not self.use_graphs:
            return self._step(constants)
        workspace = self.workspace
        device = workspace.write_offset.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # the eager run before a capture, as CUDA graphs need
            output = self._step(constants)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records the same step; nothing runs
            captured = self._step(constants)
        workspace.graph_output = type(captured)(**{k: v for k, v in captured.items() if k not in CACHE_FIELDS})
        workspace.graph = graph
        self.captures += 1
        return output


@functools.lru_cache(maxsize=None)
def _deferred_stop_check_class(upstream: type) -> type:
    """transformers' `DeferredStopCheck`, also used for a cache that static decoding drives on CUDA. It asks
    the cache, not a closure over it: a class is freed only by the cycle collector, which would keep a
    closed-over cache and its KV alive long after `generate`."""

    class DeferredForStaticDecoding(upstream):
        @staticmethod
        def is_supported(device, cache, cache_is_returned, is_assistant):
            static = getattr(cache, "static_decoding", None) is not None
            if not static or is_assistant or device.type not in DEFERRED_DEVICES:
                return upstream.is_supported(device, cache, cache_is_returned, is_assistant)
            return cache.is_croppable or not cache_is_returned

    return DeferredForStaticDecoding


@contextlib.contextmanager
def deferred_stop_check():
    """Within this `generate`, let transformers read its "every sequence finished" flag one step late.

    The flag lives on the device; reading it every step (transformers' default off Apple's mps) makes the host
    wait for each step to finish before it prepares the next, so the host's per-step work (logits processing,
    input preparation) adds to the device's instead of overlapping it. transformers' own `DeferredStopCheck`
    copies the flag without blocking and reads it on the following step; when the flag says stop, the one step
    run too many is undone (`StaticDecoding.undo_steps` through `cache.crop`). Only for caches under static
    decoding, and only where the installed transformers has it.
    """
    upstream = getattr(generation_utils, "DeferredStopCheck", None)
    if upstream is None:
        yield
        return
    generation_utils.DeferredStopCheck = _deferred_stop_check_class(upstream)
    try:
        yield
    finally:
        generation_utils.DeferredStopCheck = upstream
