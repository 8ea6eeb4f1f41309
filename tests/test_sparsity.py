"""Parameter sparsity on tiny random-weight models, with activations from real forward passes.

The literal references below are written from the papers' formulas, independently of vlmcompress.sparsity:
plain Python loops and sorts for Wanda and magnitude, and a column-by-column OBS loop with explicit inverses
of the remaining Hessian for SparseGPT.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from vlmcompress.sparsity import (
    SPARSITY_METHODS, default_calibration, ecoflap_allocate, load_sparsity_report, magnitude_mask,
    sparsegpt_prune, sparsify, sparsity_option_names, to_semi_structured, validate_sparsity_args, wanda_mask,
)
from vlmcompress.testing import build_tiny_model, chat_prompt, random_image

ALL_TARGETS = ("vision_tower", "projector", "language_model")
RATIO = 0.5


def floor_count(ratio, n):
    return int(math.floor(ratio * n + 1e-9))


def linears_of(model, prefix=""):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)}


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def calibration_rows(n=3, seed=0):
    return [{"image": random_image(seed + i), "question": f"What is in picture {i}?", "answer": "Noise, mostly."}
            for i in range(n)]


def processed(processor, rows):
    """The inputs the model sees for each row (same formatting as the library: user turn + assistant answer)."""
    out = []
    for row in rows:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]},
                    {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}]
        prompt = processor.apply_chat_template(messages, tokenize=False)
        out.append(dict(processor(text=[prompt], images=[row["image"]], return_tensors="pt")))
    return out


def linear_inputs(model, names, inputs_list):
    """Inputs X [tokens, in] of the named Linear layers over full forward passes of `model`."""
    store = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(
        lambda m, a, o, n=n: store[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).double())) for n in names]
    try:
        with torch.no_grad():
            for inputs in inputs_list:
                model(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


# ----- literal references -------------------------------------------------------------------------------
def literal_wanda_mask(W, X, ratio):
    """S_ij = |W_ij| * ||X_j||_2; per output row, prune the floor(ratio * in) lowest (Python loops)."""
    rows, cols = W.shape
    norms = [math.sqrt(sum(float(x) ** 2 for x in X[:, j].tolist())) for j in range(cols)]
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    k = floor_count(ratio, cols)
    for i in range(rows):
        scores = [(abs(float(W[i, j])) * norms[j], j) for j in range(cols)]
        for _, j in sorted(scores)[:k]:
            mask[i, j] = True
    return mask


def literal_nm_mask(score_rows, n, m):
    """In each group of m consecutive inputs of each row, prune the m-n lowest."""
    rows, cols = len(score_rows), len(score_rows[0])
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        for g in range(0, cols, m):
            for _, j in sorted((score_rows[i][j], j) for j in range(g, g + m))[: m - n]:
                mask[i, j] = True
    return mask


def literal_magnitude_mask(W, ratio, comparison="layer"):
    rows, cols = W.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    if comparison == "layer":
        entries = sorted((abs(float(W[i, j])), i, j) for i in range(rows) for j in range(cols))
        for _, i, j in entries[: floor_count(ratio, rows * cols)]:
            mask[i, j] = True
    else:
        for i in range(rows):
            for _, j in sorted((abs(float(W[i, j])), j) for j in range(cols))[: floor_count(ratio, cols)]:
                mask[i, j] = True
    return mask


def literal_sparsegpt(W, H, ratio, blocksize, nm=None, percdamp=0.01):
    """Column by column OBS with explicit inverses of the Hessian of the columns not yet processed."""
    W = W.clone().double()
    H = H.clone().double()
    cols = W.shape[1]
    H = H + percdamp * torch.diagonal(H).mean() * torch.eye(cols, dtype=torch.float64)
    inv_diag = []  # [H_F^-1]_qq with F = {q, ..., cols-1}, from the explicit inverse of H[F, F]
    for q in range(cols):
        inv_diag.append(torch.linalg.inv(H[q:, q:])[0, 0])
    mask = torch.zeros_like(W, dtype=torch.bool)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        if nm is None:  # mask of the whole block from the saliencies at the block start
            sal = sorted((float(W[i, q]) ** 2 / float(inv_diag[q]), i, q)
                         for i in range(W.shape[0]) for q in range(b0, b1))
            for _, i, q in sal[: floor_count(ratio, W.shape[0] * (b1 - b0))]:
                mask[i, q] = True
        for q in range(b0, b1):
            if nm is not None and (q - b0) % nm[1] == 0:
                n, m = nm
                sal = [[float(W[i, c]) ** 2 / float(inv_diag[c]) for c in range(q, q + m)] for i in range(W.shape[0])]
                mask[:, q:q + m] = literal_nm_mask(sal, n, m)
            Hinv = torch.linalg.inv(H[q:, q:])  # rows/cols: q, q+1, ...
            for i in range(W.shape[0]):
                if mask[i, q]:
                    W[i, q:] -= W[i, q] / Hinv[0, 0] * Hinv[0, :]
                    W[i, q] = 0.0
    return W, mask


# ----- arguments ----------------------------------------------------------------------------------------
def test_registry_and_options():
    assert set(SPARSITY_METHODS) == {"magnitude", "wanda", "sparsegpt", "ecoflap"}
    for name, spec in SPARSITY_METHODS.items():
        module = __import__(f"vlmcompress.sparsity.{name}", fromlist=["x"])
        assert "20" in module.__doc__.split("\n\n")[0] and "Formula" in module.__doc__  # paper + year, formula
        assert {"targets", "num_samples", "progress"} <= sparsity_option_names(name)
    assert "blocksize" in sparsity_option_names("sparsegpt") and "max_layer_ratio" in sparsity_option_names("ecoflap")


@pytest.mark.parametrize("method, ratio, pattern, words", [
    ("obs", 0.5, "unstructured", ["wanda", "sparsegpt", "ecoflap", "magnitude"]),
    (None, 0.5, "unstructured", ["wanda"]),
    ("wanda", 1.0, "unstructured", ["[0, 1)"]),
    ("wanda", -0.1, "unstructured", ["[0, 1)"]),
    ("wanda", "half", "unstructured", ["number"]),
    ("wanda", True, "unstructured", ["number"]),
    ("wanda", float("nan"), "unstructured", ["[0, 1)"]),
    ("wanda", 0.5, "2-4", ["2:4", "4:8", "unstructured"]),
    ("wanda", 0.5, "4:2", ["0 < N < M"]),
    ("sparsegpt", 0.3, "2:4", ["sparsity_ratio=0.5"]),
    ("ecoflap", 0.3, "2:4", ["sparsity_ratio=0.5"]),
    ("ecoflap", 0.5, "2/4", ["2:4", "4:8", "unstructured"]),
    ("ecoflap", 0.5, "4:4", ["0 < N < M"]),
])
def test_bad_arguments(method, ratio, pattern, words):
    with pytest.raises(ValueError) as error:
        validate_sparsity_args(method, ratio, pattern)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("method, pattern, options, words", [
    ("magnitude", "unstructured", {"comparison": "column"}, ["comparison", "layer", "row"]),
    ("sparsegpt", "4:8", {"blocksize": 12}, ["blocksize", "multiple of M"]),
    ("ecoflap", "unstructured", {"max_layer_ratio": 0.4}, ["max_layer_ratio"]),
    ("ecoflap", "2:4", {"max_layer_ratio": 0.7, "zo_samples": 8}, ["'max_layer_ratio', 'zo_samples'", "no effect",
                                                                    "unstructured"]),
    ("wanda", "unstructured", {"blocksize": 64}, ["valid options"]),
    ("wanda", "unstructured", {"targets": "decoder"}, ["language_model"]),
])
def test_bad_options_fail_in_load_before_any_weight_is_read(tmp_path, monkeypatch, method, pattern, options, words):
    import vlmcompress
    from vlmcompress.models import MODEL_CLASSES
    from vlmcompress.testing import save_tiny_model

    path = save_tiny_model("qwen2_vl", tmp_path / "qwen2_vl")
    monkeypatch.setattr(MODEL_CLASSES["qwen2_vl"], "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: pytest.fail("the weights were read")))
    with pytest.raises(ValueError) as error:
        vlmcompress.load(str(path), sparsity=method, sparsity_ratio=0.5, sparsity_pattern=pattern, **options)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("options", [{"sparsity_ratio": 0.3}, {"sparsity_pattern": "2:4"}])
def test_sparsity_options_without_a_method_are_refused(tmp_path, options):
    """A ratio or pattern alone would load a dense model: refused, naming the methods."""
    import vlmcompress
    from vlmcompress.testing import save_tiny_model

    path = save_tiny_model("qwen2_vl", tmp_path / "qwen2_vl")
    with pytest.raises(ValueError, match="given without sparsity=...: choose one of .*'wanda'"):
        vlmcompress.load(str(path), **options)


def test_valid_arguments():
    assert validate_sparsity_args("Wanda", 0.5, "2:4") == ("wanda", 0.5, (2, 4))
    assert validate_sparsity_args("sparsegpt", 0.5, "4:8") == ("sparsegpt", 0.5, (4, 8))
    assert validate_sparsity_args("magnitude", 0, "2:4") == ("magnitude", 0.0, (2, 4))
    assert validate_sparsity_args("ecoflap", 0.7) == ("ecoflap", 0.7, None)
    assert validate_sparsity_args("ecoflap", 0.5, "4:8") == ("ecoflap", 0.5, (4, 8))
    assert validate_sparsity_args("ecoflap", 0.5, "2:4", zo_samples=32) == ("ecoflap", 0.5, (2, 4))  # the default


@pytest.fixture
def qwen():
    return build_tiny_model("qwen2_vl")


def test_errors_leave_the_model_untouched(qwen):
    model, processor = qwen
    before = weights(model)
    # 3:5 does not divide the 64-wide inputs: the error names a layer and the fix
    with pytest.raises(ValueError, match=r"model\.(language_model|visual)\..*in_features=64.*unstructured"):
        sparsify(model, processor, "wanda", 0.4, "3:5", calibration_rows(1), progress=False)
    with pytest.raises(ValueError, match=r"in_features=64.*unstructured"):
        sparsify(model, processor, "ecoflap", 0.4, "3:5", calibration_rows(1), progress=False)
    with pytest.raises(ValueError, match="empty"):
        sparsify(model, processor, "wanda", 0.5, calibration=[], progress=False)
    import datasets

    empty = datasets.Dataset.from_dict({"image": [], "question": []})
    with pytest.raises(ValueError, match="empty"):
        sparsify(model, processor, "sparsegpt", 0.5, calibration=empty, progress=False)
    with pytest.raises(ValueError, match="valid options"):
        sparsify(model, processor, "wanda", 0.5, calibration=calibration_rows(1), blocksize=64, progress=False)
    with pytest.raises(ValueError, match="max_layer_ratio"):
        sparsify(model, processor, "ecoflap", 0.5, calibration=calibration_rows(1), max_layer_ratio=0.4,
                 progress=False)
    with pytest.raises(ValueError, match="language_model"):
        sparsify(model, processor, "wanda", 0.5, calibration=calibration_rows(1), targets=("lm",), progress=False)
    with pytest.raises(ValueError, match="image"):  # a text-only sample cannot calibrate the vision tower
        sparsify(model, processor, "wanda", 0.5, calibration=[{"question": "hello"}], targets=("vision_tower",),
                 progress=False)
    after = weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("method", sorted(SPARSITY_METHODS))
def test_ratio_zero_leaves_the_model_untouched(qwen, method):
    model, processor = qwen
    before = weights(model)
    report = sparsify(model, processor, method, 0.0, calibration=calibration_rows(1), targets=ALL_TARGETS,
                      progress=False)
    after = weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert report.overall == 0.0 and report.layers


# ----- exact sparsity and valid N:M masks ----------------------------------------------------------------
def expected_zeros(method, shape, ratio, nm, options):
    rows, cols = shape
    if nm is not None:
        return rows * cols // nm[1] * (nm[1] - nm[0])
    if method == "magnitude" and options.get("comparison", "layer") == "layer":
        return floor_count(ratio, rows * cols)
    if method == "sparsegpt":
        bs = options.get("blocksize", 128)
        return sum(floor_count(ratio, rows * (min(b + bs, cols) - b)) for b in range(0, cols, bs))
    return rows * floor_count(ratio, cols)


@pytest.mark.parametrize("method, pattern, ratio, options", [
    ("magnitude", "unstructured", 0.3, {}),
    ("magnitude", "unstructured", 0.6, {"comparison": "row"}),
    ("magnitude", "2:4", 0.5, {}),
    ("wanda", "unstructured", 0.3, {}),
    ("wanda", "2:4", 0.5, {}),
    ("wanda", "4:8", 0.5, {}),
    ("sparsegpt", "unstructured", 0.55, {"blocksize": 48}),
    ("sparsegpt", "2:4", 0.5, {}),
    ("sparsegpt", "4:8", 0.5, {"blocksize": 32}),
    ("ecoflap", "2:4", 0.5, {}),
    ("ecoflap", "4:8", 0.5, {}),
])
def test_exact_sparsity_and_nm_groups(qwen, method, pattern, ratio, options):
    model, processor = qwen
    dense = weights(model)
    report = sparsify(model, processor, method, ratio, pattern, calibration_rows(2), targets=ALL_TARGETS,
                      progress=False, **options)
    nm = None if pattern == "unstructured" else tuple(int(x) for x in pattern.split(":"))
    modules = dict(model.named_modules())
    prunable = [n for n in linears_of(model) if n.startswith(("model.visual.blocks", "model.visual.merger",
                                                                "model.language_model.layers"))]
    assert sorted(layer.name for layer in report.layers) == sorted(prunable)
    total_zeros = total = 0
    for layer in report.layers:
        W = modules[layer.name].weight
        zeros = int((W == 0).sum())
        assert zeros == expected_zeros(method, tuple(W.shape), ratio, nm, options), layer.name
        assert layer.zeros == zeros and layer.numel == W.numel()
        assert layer.sparsity == pytest.approx(zeros / W.numel())
        if nm is not None:
            n, m = nm
            groups = (W.reshape(W.shape[0], -1, m) != 0).sum(-1)
            assert int(groups.max()) <= n, layer.name
        total_zeros += zeros
        total += W.numel()
    assert report.overall == pytest.approx(total_zeros / total)
    pruned = {f"{layer.name}.weight" for layer in report.layers}
    for name, w in weights(model).items():  # everything else (embeddings, lm_head, norms, biases) untouched
        if name not in pruned:
            assert torch.equal(w, dense[name]), name
    text = str(report)
    assert "overall" in text and report.layers[0].name in text


# ----- literal references: Wanda and magnitude ----------------------------------------------------------
def literal_sequential_wanda(model, inputs_list, ratio, nm=None):
    """Prune the LM's decoder layers one at a time with literal Wanda masks; each layer's inputs come from a
    full forward of the model in which the earlier layers are already pruned."""
    layers = model.model.language_model.layers
    for i in range(len(layers)):
        names = [f"model.language_model.layers.{i}.{n}" for n, m in layers[i].named_modules()
                 if isinstance(m, nn.Linear)]
        X = linear_inputs(model, names, inputs_list)
        modules = dict(model.named_modules())
        for name in names:
            W = modules[name].weight.data
            if nm is None:
                mask = literal_wanda_mask(W, X[name], ratio)
            else:
                norms = X[name].pow(2).sum(0).sqrt()
                mask = literal_nm_mask((W.abs().double() * norms).tolist(), *nm)
            W[mask] = 0
    return model


@pytest.mark.parametrize("arch, pattern", [("qwen2_vl", "unstructured"), ("llava_onevision", "unstructured"),
                                           ("internvl", "2:4")])
def test_wanda_equals_literal_sequential_reference(arch, pattern):
    model, processor = build_tiny_model(arch)
    rows = calibration_rows(2)
    reference = literal_sequential_wanda(copy.deepcopy(model), processed(processor, rows), RATIO,
                                         None if pattern == "unstructured" else (2, 4))
    dense = copy.deepcopy(model)
    sparsify(model, processor, "wanda", RATIO, pattern, rows, progress=False)
    lm = "model.language_model.layers"
    ref_w, got_w = weights(reference), weights(model)
    for name in ref_w:
        assert torch.equal(ref_w[name] == 0, got_w[name] == 0), name
        assert torch.equal(ref_w[name], got_w[name]), name
    # The reference is sensitive to the sequential order: masks from the dense model's activations differ.
    X = linear_inputs(dense, [f"{lm}.3.mlp.down_proj"], processed(processor, rows))[f"{lm}.3.mlp.down_proj"]
    if pattern == "unstructured":
        dense_mask = literal_wanda_mask(dense.get_submodule(f"{lm}.3.mlp.down_proj").weight.data, X, RATIO)
        assert not torch.equal(dense_mask, got_w[f"{lm}.3.mlp.down_proj.weight"] == 0)


@pytest.mark.parametrize("comparison", ["layer", "row"])
def test_magnitude_equals_literal_reference(qwen, comparison):
    model, processor = qwen
    dense = weights(model)
    sparsify(model, processor, "magnitude", 0.4, targets=ALL_TARGETS, comparison=comparison, progress=False)
    report_layers = model.sparsity_report.per_layer()
    for name in report_layers:
        W = dense[f"{name}.weight"]
        expected = literal_magnitude_mask(W, 0.4, comparison)
        assert torch.equal(model.get_submodule(name).weight == 0, expected), name
        assert torch.equal(magnitude_mask(W, 0.4, comparison=comparison), expected)
    # 2:4 magnitude on one layer
    W = dense["model.language_model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(magnitude_mask(W, 0.5, (2, 4)), literal_nm_mask(W.abs().tolist(), 2, 4))


# ----- SparseGPT ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_layer_inputs():
    """A decoder layer's Linear weights and their real inputs from full forward passes (LLaVA-OneVision)."""
    model, processor = build_tiny_model("llava_onevision")
    names = ["model.language_model.layers.1.mlp.down_proj", "model.language_model.layers.1.self_attn.k_proj",
             "model.language_model.layers.2.mlp.gate_proj"]
    X = linear_inputs(model, names, processed(processor, calibration_rows(3)))
    return {n: (model.get_submodule(n).weight.detach().double().clone(), X[n]) for n in names}


def output_error(W, W_hat, X):
    return float(torch.linalg.norm(X @ W.t() - X @ W_hat.t()))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(real_layer_inputs, pattern):
    nm = None if pattern == "unstructured" else tuple(int(x) for x in pattern.split(":"))
    for name, (W, X) in real_layer_inputs.items():
        H = X.t() @ X
        W_sgpt, mask = sparsegpt_prune(W, H, RATIO, nm)
        W_wanda = W.masked_fill(wanda_mask(W, X.pow(2).sum(0), RATIO, nm), 0)
        W_mag = W.masked_fill(magnitude_mask(W, RATIO, nm, comparison="row"), 0)
        W_mag_layer = W.masked_fill(magnitude_mask(W, RATIO, nm, comparison="layer"), 0)
        assert int((W_sgpt == 0).sum()) == int((W_wanda == 0).sum()) == int((W_mag == 0).sum())
        assert torch.equal(W_sgpt == 0, mask)
        e_sgpt = output_error(W, W_sgpt, X)
        assert e_sgpt < output_error(W, W_wanda, X), name
        assert e_sgpt < output_error(W, W_mag, X), name
        assert e_sgpt < output_error(W, W_mag_layer, X), name


@pytest.mark.parametrize("pattern, blocksize", [("unstructured", 128), ("unstructured", 16), ("2:4", 16),
                                                ("4:8", 128)])
def test_sparsegpt_equals_literal_reference(real_layer_inputs, pattern, blocksize):
    nm = None if pattern == "unstructured" else tuple(int(x) for x in pattern.split(":"))
    W, X = real_layer_inputs["model.language_model.layers.1.self_attn.k_proj"]  # 32 x 64
    W = W[:12]  # a small layer: the reference inverts a matrix per column
    H = X.t() @ X
    got, mask = sparsegpt_prune(W, H, RATIO, nm, blocksize=blocksize)
    ref, ref_mask = literal_sparsegpt(W, H, RATIO, blocksize, nm)
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(got, ref, atol=1e-9, rtol=1e-7)
    assert not torch.allclose(got, W.masked_fill(mask, 0))  # the kept weights were really updated


def test_sparsegpt_in_the_model_is_sequential(qwen):
    model, processor = qwen
    rows = calibration_rows(2)
    dense = copy.deepcopy(model)
    report = sparsify(model, processor, "sparsegpt", RATIO, calibration=rows, progress=False)
    assert report.num_samples == 2 and report.calibration_tokens > 0
    lm = "model.language_model.layers"
    # layer 2's q_proj was pruned from the inputs of the model whose layers 0-1 were already pruned
    name = f"{lm}.2.self_attn.q_proj"
    partially = copy.deepcopy(dense)
    for i in (0, 1):
        for n, m in partially.model.language_model.layers[i].named_modules():
            if isinstance(m, nn.Linear):
                m.weight.data.copy_(model.get_submodule(f"{lm}.{i}.{n}").weight)
    X = linear_inputs(partially, [name], processed(processor, rows))[name]
    expected, _ = sparsegpt_prune(dense.get_submodule(name).weight.data.double(), X.t() @ X, RATIO)
    assert torch.allclose(model.get_submodule(name).weight.double(), expected, atol=2e-4)
    assert torch.equal(model.get_submodule(name).weight == 0, expected == 0)


# ----- ECoFLaP ------------------------------------------------------------------------------------------
def test_ecoflap_allocation_rule():
    sizes = [100, 100, 200, 100]
    scores = [1.0, 3.0, 2.0, 0.5]
    ratios = ecoflap_allocate(scores, sizes, 0.5, max_ratio=0.8)
    keep = [(1 - r) * n for r, n in zip(ratios, sizes)]
    assert sum(keep) == pytest.approx(0.5 * sum(sizes))
    extra = [k - n * 0.2 for k, n in zip(keep, sizes)]  # above the floor: proportional to the score
    for e, s in zip(extra, scores):
        assert e / s == pytest.approx(extra[0] / scores[0])
    # caps: a dominant score saturates (ratio = min bound), the rest is shared, mean still the target
    ratios = ecoflap_allocate([100.0, 1.0, 1.0, 1.0], [100] * 4, 0.3, max_ratio=0.6, min_ratio=0.1)
    assert ratios[0] == pytest.approx(0.1)
    assert ratios[1:] == pytest.approx([1 - (40 + 70 / 3) / 100] * 3)
    assert all(0.1 - 1e-12 <= r <= 0.6 + 1e-12 for r in ratios)
    assert sum(ratios) / 4 == pytest.approx(0.3)
    assert ecoflap_allocate([0, 0], [10, 10], 0.3) == pytest.approx([0.3, 0.3])


def test_ecoflap_on_a_model(qwen):
    model, processor = qwen
    dense = copy.deepcopy(model)
    rows = calibration_rows(4)
    report = sparsify(model, processor, "ecoflap", RATIO, calibration=rows, targets=("vision_tower", "language_model"),
                      zo_samples=4, zo_batch_size=2, progress=False)
    ratios = report.block_ratios
    blocks = [f"model.visual.blocks.{i}" for i in range(2)] + [f"model.language_model.layers.{i}" for i in range(4)]
    assert list(ratios) == blocks
    values = list(ratios.values())
    assert max(values) - min(values) > 0.02  # the allocation is not uniform
    sizes = {b: sum(m.weight.numel() for m in linears_of(model, b + ".").values()) for b in blocks}
    mean = sum(ratios[b] * sizes[b] for b in blocks) / sum(sizes.values())
    assert mean == pytest.approx(RATIO, abs=1e-9)
    assert all(0.0 <= r <= RATIO + 0.1 + 1e-12 for r in values)
    lm_mean = sum(ratios[b] for b in blocks[2:]) / 4
    assert 0 < lm_mean < 1
    # a block with a higher score per weight never gets a higher ratio (keep grows with the score)
    scores = report.block_scores
    assert all(s > 0 for s in scores.values())
    by_score = sorted(blocks, key=lambda b: scores[b] / sizes[b])
    assert all(ratios[a] >= ratios[b] - 1e-12 for a, b in zip(by_score, by_score[1:]))
    # locally: Wanda with the block's ratio (exact per-row counts)
    for layer in report.layers:
        block = layer.name.rsplit(".", 2)[0]
        assert layer.target == pytest.approx(ratios[block])
        rows_, cols = layer.shape
        assert layer.zeros == rows_ * floor_count(ratios[block], cols), layer.name
    # the zeroth-order stage restored every weight before pruning: unpruned entries equal the dense ones
    for name, w in weights(model).items():
        keep = w != 0
        assert torch.equal(w[keep], weights(dense)[name][keep]), name


def literal_ecoflap_nm_mask(W, X, n, m):
    """ECoFLaP's N:M branch as the reference code runs it (LAVIS wanda_pruner.py `_prune`, `prune_n != 0`): the
    block's ratio is not read; score |W_ij| * sqrt(scaler_j), scaler_j the mean over tokens of X_tj^2 (its running
    mean: Wanda's squared norm up to a constant), and each row loses the m - n lowest of every m inputs."""
    cols = W.shape[1]
    tokens = X.shape[0]
    scaler = [sum(float(x) ** 2 for x in X[:, j].tolist()) / tokens for j in range(cols)]
    scores = [[abs(float(W[i, j])) * math.sqrt(scaler[j]) for j in range(cols)] for i in range(W.shape[0])]
    return literal_nm_mask(scores, n, m)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_ecoflap_nm_mask_equals_literal_reference(real_layer_inputs, pattern):
    n, m = (int(x) for x in pattern.split(":"))
    prune = SPARSITY_METHODS["ecoflap"].prune
    for name, (W, X) in real_layer_inputs.items():
        W = W.float()
        pruned, mask = prune(W, X.pow(2).sum(0).float(), 1 - n / m, (n, m))
        assert torch.equal(mask, literal_ecoflap_nm_mask(W, X, n, m)), name
        assert torch.equal(pruned, W.masked_fill(mask, 0)), name
        zeros_per_group = (pruned.reshape(W.shape[0], -1, m) == 0).sum(-1)
        assert bool((zeros_per_group == m - n).all()), name  # exactly M - N zeros in every group of M inputs


def test_ecoflap_nm_on_a_model(monkeypatch):
    """At N:M the whole model is pruned block by block with the N:M masks (sequential calibration), every block
    at 1 - N/M, and no zeroth-order forward runs."""
    import vlmcompress.sparsity as sparsity

    monkeypatch.setattr(sparsity, "zeroth_order_scores", lambda *a, **k: pytest.fail("coarse stage ran at N:M"))
    model, processor = build_tiny_model("qwen2_vl")
    rows = calibration_rows(2)
    reference = literal_sequential_wanda(copy.deepcopy(model), processed(processor, rows), RATIO, (2, 4))
    report = sparsify(model, processor, "ecoflap", RATIO, "2:4", rows, progress=False)
    got, expected = weights(model), weights(reference)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert report.block_ratios == {} and report.block_scores == {}
    assert all(layer.target == RATIO for layer in report.layers)
    assert set(report.options) == {"num_samples"}  # the coarse-stage options did not apply
    inputs = processed(processor, rows[:1])[0]
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[-1] == inputs["input_ids"].shape[-1] + 3


def test_ecoflap_scores_track_gradient_norms():
    """The forward-only block scores estimate E|z . grad| = sqrt(2/pi) ||grad||: same ranking of the blocks as
    the true (backpropagated) gradient norms of the same loss, and the same size within a factor 2."""
    from vlmcompress.sparsity import zeroth_order_scores
    from vlmcompress.sparsity.calibration import prepare_calibration
    from vlmcompress.sparsity.ecoflap import text_labels
    from vlmcompress.sparsity.sequential import find_stacks

    model, processor = build_tiny_model("qwen2_vl")
    groups = dict(find_stacks(model, ("language_model",))[0].linears)
    samples = prepare_calibration(processor, calibration_rows(4), 4)
    draws = 8
    zo = zeroth_order_scores(model, processor, groups, samples, torch.device("cpu"), zo_samples=4, zo_batch_size=1,
                             num_noise=draws, zo_eps=1e-3)
    true = dict.fromkeys(groups, 0.0)
    for s in samples:
        model.zero_grad()
        model(**s, labels=text_labels(model, processor, s["input_ids"]), use_cache=False).loss.backward()
        for g, linears in groups.items():
            true[g] += math.sqrt(sum(float(m.weight.grad.pow(2).sum()) for m in linears.values()))
    assert sorted(groups, key=zo.get) == sorted(groups, key=true.get)
    for g in groups:
        estimate = zo[g] / (len(samples) * draws)
        expected = math.sqrt(2 / math.pi) * true[g] / len(samples)
        assert 0.5 < estimate / expected < 2, (g, estimate, expected)


# ----- calibration, save/load, load(), semi-structured --------------------------------------------------
def test_default_calibration_is_offline_and_deterministic(qwen):
    a, b = default_calibration(6), default_calibration(6)
    assert len(a) == 6
    for x, y in zip(a, b):
        assert x["answer"] == y["answer"] and list(x["image"].getdata()) == list(y["image"].getdata())
    assert len({s["answer"] for s in a}) == 6
    assert default_calibration(2, seed=1)[0]["answer"] != a[0]["answer"]
    model, processor = qwen
    report = sparsify(model, processor, "wanda", RATIO, num_samples=3, progress=False)
    assert report.num_samples == 3


def test_dataset_and_dict_calibration(qwen):
    import datasets

    model, processor = qwen
    rows = calibration_rows(2)
    ds = datasets.Dataset.from_dict({"image": [r["image"] for r in rows], "question": [r["question"] for r in rows],
                                     "answer": [r["answer"] for r in rows]})
    twin = copy.deepcopy(model)
    sparsify(model, processor, "wanda", RATIO, calibration=ds, progress=False)
    sparsify(twin, processor, "wanda", RATIO, calibration=rows, progress=False)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n
    text_only = [{"text": "A sentence about nothing in particular."}, {"text": "Another one."}]
    report = sparsify(build_tiny_model("qwen2_vl")[0], processor, "wanda", RATIO, calibration=text_only,
                      progress=False)
    assert report.num_samples == 2 and report.overall == pytest.approx(RATIO)
    # mixed: the text-only sample calibrates the language model only; the vision tower still gets pruned
    mixed = build_tiny_model("qwen2_vl")[0]
    report = sparsify(mixed, processor, "wanda", RATIO, calibration=text_only[:1] + rows[:1],
                      targets=("vision_tower", "language_model"), progress=False)
    assert report.overall == pytest.approx(RATIO)


def test_save_pretrained_keeps_the_zeros(qwen, tmp_path):
    from transformers import AutoModelForImageTextToText

    model, processor = qwen
    report = sparsify(model, processor, "sparsegpt", RATIO, "2:4", calibration_rows(2), targets=ALL_TARGETS,
                      progress=False)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "sparsity_report.json").read_text())
    assert saved["method"] == "sparsegpt" and saved["overall"] == pytest.approx(report.overall)
    assert load_sparsity_report(tmp_path).per_layer() == report.per_layer()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    for name, p in loaded.named_parameters():
        assert torch.equal(p, model.get_parameter(name)), name
    for layer in report.layers:
        assert int((loaded.get_submodule(layer.name).weight == 0).sum()) == layer.zeros


@pytest.mark.parametrize("method", ["wanda", "ecoflap"])
def test_load_applies_sparsity(tmp_path, method):
    import vlmcompress
    from vlmcompress.testing import save_tiny_model

    path = save_tiny_model("internvl", tmp_path / "internvl")
    model = vlmcompress.load(str(path), sparsity=method, sparsity_ratio=0.5, sparsity_pattern="2:4",
                             num_samples=2, progress=False)
    assert model.sparsity_report.method == method and model.sparsity_report.overall == pytest.approx(0.5)
    assert (model.model.language_model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5
    processor = __import__("transformers").AutoProcessor.from_pretrained(path)
    inputs = processor(text=[chat_prompt(processor, "What is it?")], images=[random_image(0)], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[-1] == inputs["input_ids"].shape[-1] + 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_semi_structured_needs_cuda(qwen):
    with pytest.raises(RuntimeError, match="CUDA"):
        to_semi_structured(qwen[0])


@pytest.mark.parametrize("targets, prefixes", [
    ("projector", ("model.visual.merger",)),
    ("vision_tower+language_model", ("model.visual.blocks", "model.language_model.layers")),
    ("all", ("model.visual.blocks", "model.visual.merger", "model.language_model.layers")),
])
def test_targets_select_the_pruned_layers(qwen, targets, prefixes):
    model, processor = qwen
    report = sparsify(model, processor, "magnitude", RATIO, targets=targets, progress=False)
    expected = sorted(n for n in linears_of(model) if n.startswith(prefixes))
    assert sorted(layer.name for layer in report.layers) == expected
    for name, module in linears_of(model).items():
        assert (int((module.weight == 0).sum()) > 0) == (name in expected), name
