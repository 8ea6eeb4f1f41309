"""Typed, validated settings for each compression family, built from `load()`'s arguments.

Everything is checked before any weight is read, and every error names the valid choices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .cache import KV_METHODS, get_cache_class
from .decoding.options import DecodingOptions
from .registry import Registry

DEFAULT_KV_BUDGET = 0.1


@dataclass(frozen=True)
class KVSettings:
    method: str
    budget: float | int
    options: dict = field(default_factory=dict)

    def make_cache(self):
        return get_cache_class(self.method)(self.budget, **self.options)


@dataclass(frozen=True)
class PruneSettings:
    method: str
    budget: float | int
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SparsitySettings:
    method: str
    ratio: float
    pattern: str
    calibration: Any = None
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class QuantSettings:
    method: str
    bits: int
    group_size: int
    calibration: Any = None
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CompressionSettings:
    kv: KVSettings | None = None
    prune: PruneSettings | None = None
    sparsity: SparsitySettings | None = None
    cuda_graphs: bool | None = None  # static decoding (vlmcompress.decoding); None: where the model is on CUDA
    decoding: DecodingOptions = DecodingOptions()  # the fast paths' switches
    quant: QuantSettings | None = None

    def describe(self) -> dict:
        """A JSON-ready summary (method, budget, options per family; decoding options where not the defaults)."""
        out = {"cuda_graphs": True} if self.cuda_graphs else {}
        if self.decoding != DecodingOptions():
            out["decoding"] = asdict(self.decoding)
        if self.kv:
            out["kv"] = {"method": self.kv.method, "budget": self.kv.budget, **self.kv.options}
        if self.prune:
            out["prune"] = {"method": self.prune.method, "budget": self.prune.budget, **self.prune.options}
        if self.sparsity:
            out["sparsity"] = {"method": self.sparsity.method, "ratio": self.sparsity.ratio,
                               "pattern": self.sparsity.pattern, **self.sparsity.options}
        if self.quant:
            out["quant"] = {"method": self.quant.method, "bits": self.quant.bits,
                            "group_size": self.quant.group_size, **self.quant.options}
        return out


def _registries() -> dict[str, Registry]:
    """Each family's method registry, where this installation has the family."""
    families = {"kv": KV_METHODS}
    try:
        from .pruning import PRUNE_METHODS
    except ImportError:
        pass
    else:
        families["prune"] = PRUNE_METHODS
    try:
        from .sparsity import SPARSITY_METHODS
    except ImportError:
        pass
    else:
        families["sparsity"] = SPARSITY_METHODS
    try:
        from .quantization import QUANT_METHODS
    except ImportError:
        pass
    else:
        families["quant"] = QUANT_METHODS
    return families


def accepted_options(kv: str | None = None, prune: str | None = None, sparsity: str | None = None,
                     quant: str | None = None) -> set[str]:
    """The option names the chosen methods take together (e.g. to filter a shared option list)."""
    families = _registries()
    selected = {"kv": kv, "prune": prune, "sparsity": sparsity, "quant": quant}
    return set().union(*(families[f].option_names(m) for f, m in selected.items() if m is not None and f in families))


def build_settings(
    kv: str | None = None,
    kv_budget: float | int | None = None,
    prune: str | None = None,
    prune_budget: float | int | None = None,
    sparsity: str | None = None,
    sparsity_ratio: float | None = None,
    sparsity_pattern: str | None = None,
    calibration: Any = None,
    cuda_graphs: bool | None = None,
    decoding: DecodingOptions | None = None,
    quant: str | None = None,
    quant_bits: int | None = None,
    quant_group_size: int | None = None,
    **method_options,
) -> CompressionSettings:
    """Validate `load()`'s compression arguments and route each option to the family that takes it."""
    if kv is not None and not isinstance(kv, str):
        raise ValueError(f"kv must be a method name, one of {sorted(KV_METHODS)}, got {kv!r}")
    if kv is not None and kv.lower() in ("none", ""):
        kv = None
    if kv is None and kv_budget is not None:
        raise ValueError(f"kv_budget={kv_budget!r} was given without kv=...: choose one of {sorted(KV_METHODS)}")
    if quant is not None and isinstance(quant, str) and quant.strip().lower() in ("none", ""):
        quant = None
    given_without = [(option, value, method) for option, value, method in (
        ("sparsity_ratio", sparsity_ratio, sparsity), ("sparsity_pattern", sparsity_pattern, sparsity),
        ("quant_bits", quant_bits, quant), ("quant_group_size", quant_group_size, quant)) if value is not None]
    for option, value, method in given_without:
        if method is None:
            family = option.split("_")[0]
            raise ValueError(f"{option}={value!r} was given without {family}=...: choose one of "
                             f"{sorted(_registries().get(family, {}))}")
    if quant is not None and sparsity is not None:
        raise ValueError(f"quant={quant!r} with sparsity={sparsity!r} is not supported (GPTQ and AWQ rewrite the "
                         "pruned zeros): choose one of quant=... or sparsity=...")
    selected = {"kv": kv, "prune": prune, "sparsity": sparsity, "quant": quant}
    families = _registries()
    for family, method in selected.items():
        if method is not None and family not in families:
            raise ValueError(f"{family}={method!r}: this installation has no {family} methods")
    routed: dict[str, dict] = {family: {} for family in selected}
    accepted_by: dict[str, set[str]] = {
        family: families[family].option_names(method) for family, method in selected.items() if method is not None
    }
    for option, value in method_options.items():
        takers = [family for family, names in accepted_by.items() if option in names]
        if not takers:
            if not accepted_by:
                raise ValueError(f"unknown option {option}={value!r}: no method is chosen to take it (kv=..., "
                                 "prune=..., sparsity=... or quant=...), or the name is misspelled")
            valid = sorted(set().union(*accepted_by.values()))
            raise ValueError(
                f"unknown option {option}={value!r} for the chosen methods "
                f"({', '.join(f'{f}={m}' for f, m in selected.items() if m) or 'none'}); valid options: {valid}"
            )
        for family in takers:
            routed[family][option] = value

    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        raise ValueError(f"cuda_graphs must be True, False or None (static decoding where the model runs on CUDA), "
                         f"got {cuda_graphs!r}")
    if decoding is not None and not isinstance(decoding, DecodingOptions):
        raise ValueError(f"decoding must be a vlmcompress.DecodingOptions, got {decoding!r}")
    kv_settings = None
    if kv is not None:
        cache_class = get_cache_class(kv)
        budget, _, _, _, heads = cache_class.validate(DEFAULT_KV_BUDGET if kv_budget is None else kv_budget,
                                                      **routed["kv"])
        if cuda_graphs and heads.head_adaptive:
            raise ValueError("cuda_graphs=True decodes every KV head at one length, head_adaptive=True keeps a "
                             "different number of tokens in each: leave cuda_graphs unset (a head-adaptive cache "
                             "decodes eagerly) or pass cuda_graphs=False")
        kv_settings = KVSettings(cache_class.name, budget, routed["kv"])

    prune_settings = None
    if prune is not None:
        from .pruning import validate_prune_args

        method, budget = validate_prune_args(prune, prune_budget, **routed["prune"])
        prune_settings = PruneSettings(method, budget, routed["prune"])
    elif prune_budget is not None:
        raise ValueError(f"prune_budget={prune_budget!r} was given without prune=...")

    sparsity_settings = None
    if sparsity is not None:
        from .sparsity import validate_sparsity_args

        sparsity_ratio = 0.5 if sparsity_ratio is None else sparsity_ratio
        sparsity_pattern = "unstructured" if sparsity_pattern is None else sparsity_pattern
        validate_sparsity_args(sparsity, sparsity_ratio, sparsity_pattern, **routed["sparsity"])
        sparsity_settings = SparsitySettings(sparsity, sparsity_ratio, sparsity_pattern, calibration, routed["sparsity"])
    quant_settings = None
    if quant is not None:
        from .quantization import DEFAULT_BITS, DEFAULT_GROUP_SIZE, validate_quant_args

        method, bits, group_size, _ = validate_quant_args(
            quant, DEFAULT_BITS if quant_bits is None else quant_bits,
            DEFAULT_GROUP_SIZE if quant_group_size is None else quant_group_size, **routed["quant"])
        quant_settings = QuantSettings(method, bits, group_size, calibration, routed["quant"])
    return CompressionSettings(kv_settings, prune_settings, sparsity_settings, cuda_graphs,
                               decoding or DecodingOptions(), quant_settings)
