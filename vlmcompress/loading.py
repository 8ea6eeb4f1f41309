"""load(): resolve the architecture, build the settings, load the weights, apply sparsity, attach the cache factory."""

from __future__ import annotations

import importlib.util

import torch
from transformers import AutoConfig

from .architectures import ARCHITECTURES, architecture
from .config import build_settings
from .decoding.grouped_sdpa import GROUPED_SDPA
from .decoding.options import DecodingOptions
from .decoding.ragged_attention import RAGGED_ATTENTION

SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)


def default_attn_implementation(cuda_graphs: bool | None = None, head_adaptive: bool = False) -> str | dict:
    """flash-attention-2 where it is installed and a GPU is present, when static decoding is off (its masks it
    cannot take; `cuda_graphs=None` decodes statically on CUDA); SDPA otherwise, the language model's through
    `GROUPED_SDPA` (masked decoding without `repeat_kv`; otherwise transformers' SDPA). Head-adaptive budgets:
    the language model's through `RAGGED_ATTENTION` (SDPA's for the prompt, per-head lengths while decoding)."""
    if head_adaptive:
        return {"text_config": RAGGED_ATTENTION}
    if cuda_graphs is False and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return {"text_config": GROUPED_SDPA}


def load(
    pretrained: str,
    kv: str | None = None,
    kv_budget: float | int | None = None,
    prune: str | None = None,
    prune_budget: float | int | None = None,
    sparsity: str | None = None,
    sparsity_ratio: float | None = None,
    sparsity_pattern: str | None = None,
    calibration=None,
    dtype="auto",
    device_map=None,
    attn_implementation: str | None = None,
    cuda_graphs: bool | None = None,
    decoding: DecodingOptions | None = None,
    quant: str | None = None,
    quant_bits: int | None = None,
    quant_group_size: int | None = None,
    **method_options,
):
    """Load a supported LVLM with the chosen compression applied.

    Args:
        pretrained: a Hugging Face hub id or a local folder written by `save_pretrained`.
        kv: KV-cache eviction method (`streamingllm`, `h2o`, `snapkv`, `pyramidkv`, `vlcache`, `random`, `lookm`)
            or None; the option `merge=` merges what it evicts into what it keeps (`vlmcompress.cache.merge`).
        kv_budget: float in (0, 1], share of prompt tokens kept (mean over layers), or int >= 1,
            tokens kept per layer. Default 0.1 when `kv` is set.
        prune / prune_budget: visual-token pruning method and share (or count) of visual tokens kept.
        sparsity / sparsity_ratio / sparsity_pattern / calibration: weight sparsity method, the share
            of weights zeroed (default 0.5), "unstructured" (default) or "N:M", and the calibration samples
            (None: the default set).
        dtype, device_map, attn_implementation: passed to `from_pretrained` (an explicit value is used as
            given); attention defaults to flash-attention-2 where installed (with a GPU) and SDPA otherwise,
            the language model's `vlmcompress_sdpa` (`vlmcompress.decoding.grouped_sdpa`).
        cuda_graphs: static decoding (`vlmcompress.decoding`): once the prompt is compressed,
            each decoding step replays one CUDA graph instead of launching its kernels from Python; the graph
            and its buffers serve later `generate` calls whose prompts fit them (`decoding.workspace`).
            None (the default): on where the model runs on CUDA (and its attention is not flash-attention);
            False: transformers' eager decoding loop.
            Takes every kv= method (h2o and streamingllm evict within fixed buffers) or kv=None (then the
            cache keeps every token), and SDPA or eager attention. On the CPU the same static steps run
            eagerly; on CUDA with triton their elementwise kernels are compiled (`vlmcompress.compilation`).
        decoding: `DecodingOptions`, the fast paths' switches (compilation, split-KV attention, fused products,
            the deferred stop check), all on by default.
        quant / quant_bits / quant_group_size: weight quantization of the target Linear layers (`rtn`, `gptq`,
            `awq`; `vlmcompress.quantization`), 2-4 bits (default 4), 32-256 input columns per scale (default
            128), calibrated on
            `calibration`. A folder saved from a quantized model loads quantized without these.
        **method_options: options of the chosen methods (e.g. window_size=32, kernel_size=5,
            sink_tokens=4; head_adaptive=True for AdaKV's split of each layer's budget over its KV heads,
            `vlmcompress.cache.HeadAdaptive`); each goes to the method that takes it, unknown ones are an error.

    Returns the model: an instance of a subclass of the upstream transformers class, whose
    `generate` applies the compression with no extra argument.
    """
    config = AutoConfig.from_pretrained(pretrained)
    model_class = architecture(config.model_type, pretrained).model_class
    settings = build_settings(
        kv=kv, kv_budget=kv_budget, prune=prune, prune_budget=prune_budget, sparsity=sparsity,
        sparsity_ratio=sparsity_ratio, sparsity_pattern=sparsity_pattern, calibration=calibration,
        cuda_graphs=cuda_graphs, decoding=decoding, quant=quant, quant_bits=quant_bits,
        quant_group_size=quant_group_size, **method_options,
    )
    head_adaptive = settings.kv is not None and settings.kv.options.get("head_adaptive", False)
    text_attention = (attn_implementation.get("text_config") if isinstance(attn_implementation, dict)
                      else attn_implementation)
    if head_adaptive and attn_implementation is not None and text_attention != RAGGED_ATTENTION:
        raise ValueError(f"head_adaptive=True keeps a different number of tokens in each KV head, which only "
                         f"attn_implementation={RAGGED_ATTENTION!r} decodes, not {attn_implementation!r}: leave "
                         f"attn_implementation=None (it picks {RAGGED_ATTENTION!r})")
    from .quantization import checkpoint
    from .quantization.base import check_group_fits_config

    if settings.quant is not None:
        check_group_fits_config(config, settings.quant.group_size, settings.quant.options.get("targets"))
    saved_quantization = checkpoint.read_quantization(pretrained)
    if saved_quantization is not None and (settings.quant is not None or settings.sparsity is not None):
        raise ValueError(f"{pretrained} holds a {saved_quantization['method']}-quantized model: load it without "
                         "quant=/sparsity=, or quantize the original checkpoint")
    if saved_quantization is not None:
        model_class = checkpoint.quantized_model_class(model_class, saved_quantization)
    model = model_class.from_pretrained(
        pretrained,
        dtype=dtype,
        device_map=device_map,
        attn_implementation=attn_implementation or default_attn_implementation(cuda_graphs, head_adaptive),
    ).eval()
    if saved_quantization is not None:
        checkpoint.restored(model, saved_quantization)
    model.compression = settings
    if settings.sparsity is not None:
        from transformers import AutoProcessor

        from .sparsity import sparsify

        s = settings.sparsity
        model.sparsity_report = sparsify(
            model, AutoProcessor.from_pretrained(pretrained), s.method, s.ratio, s.pattern, s.calibration, **s.options
        )
    if settings.quant is not None:
        from transformers import AutoProcessor

        from .quantization import quantize

        q = settings.quant
        quantize(model, AutoProcessor.from_pretrained(pretrained), q.method, q.bits, q.group_size, q.calibration,
                 **q.options)
    return model
