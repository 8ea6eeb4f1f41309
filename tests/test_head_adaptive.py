"""Head-adaptive budgets (AdaKV, `head_adaptive=True`): the split over KV heads equals a literal loop over the
paper's rule, the layers are stored ragged (bytes = kept tokens + room), decoding attends them exactly, and the
invariants of DESIGN.md hold on every architecture: identity at full budget, eviction equals masking (per
(head, position) pair), batch equals single, the budget is the budget; bad options are refused."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BATCHES, generate_with_raw_logits, image_inputs, upstream_model
from test_kv_cache import F64, assert_batch_equals_single, expected_kept, greedy, masked_reference_logits
from test_kv_merge import literal_merge, prompt_keys_and_values
from test_kv_references import attention_maps, mean_over_group, round_half_up, snapkv_scores

import vlmcompress
from vlmcompress.cache import PROTECTED, SnapKVCache
from vlmcompress.cache.head_adaptive import HeadAdaptive
from vlmcompress.cache.ragged_layer import GROWTH, RaggedLayer
from vlmcompress.decoding.ragged_attention import (
    RAGGED_ATTENTION,
    RaggedSegments,
    ragged_attention,
)
from vlmcompress.testing import ARCHITECTURES

OPTIONS = {"h2o": {}, "snapkv": {"window_size": 4}, "pyramidkv": {"window_size": 4}, "vlcache": {"window_size": 4},
           "random": {"window_size": 4}}
# every architecture with SnapKV, and each other prefill method on one architecture (CPU time stays small)
CASES = [(arch, "snapkv") for arch in ARCHITECTURES] + [
    ("qwen2_vl", "pyramidkv"), ("llava_onevision", "vlcache"), ("internvl", "random")]


def load(path, method, budget, **kwargs):
    return vlmcompress.load(path, kv=method, kv_budget=budget, head_adaptive=True, **OPTIONS[method], **kwargs)


def literal_adakv(scores: list[list[float]], budget: int, alpha: float) -> list[set[int]]:
    """AdaKV's split of one sample's layer, looping over heads and positions: `scores[head][j]` (None: padding,
    never kept; >= PROTECTED: always kept). Each head keeps its protected positions and its own top
    floor(alpha (budget - protected)); the rest of heads x budget goes to the best of every (head, position)
    left, ties to the lower (head, position)."""
    kept, total = [], len(scores) * budget
    for row in scores:
        protected = sorted((j for j, s in enumerate(row) if s is not None and s >= PROTECTED),
                           key=lambda j: -row[j])[:budget]
        floor = math.floor(alpha * (budget - len(protected)))
        others = sorted((j for j, s in enumerate(row) if s is not None and s < PROTECTED), key=lambda j: (-row[j], j))
        kept.append(set(protected) | set(others[:floor]))
    pool = [(-s, head, j) for head, row in enumerate(scores) for j, s in enumerate(row)
            if s is not None and s < PROTECTED and j not in kept[head]]
    for _, head, j in sorted(pool)[: total - sum(len(k) for k in kept)]:
        kept[head].add(j)
    return kept


def kept_sets(layer: RaggedLayer, sample: int = 0, shift: int = 0) -> list[set[int]]:
    return [{int(p) - shift for p in row if p >= 0} for row in layer.kept_indices[sample]]


@pytest.mark.parametrize("seed", range(6))
def test_the_split_equals_the_literal_rule(seed):
    """Random scores with padding, a protected window, per-sample budgets and every floor from none to all."""
    generator = torch.Generator().manual_seed(seed)
    batch, heads, n = 3, 4, 17
    head_scale = torch.tensor([4.0, 1, 1, 0.5], dtype=F64)[:, None]  # head 0 scores most
    scores = torch.rand(batch, heads, n, generator=generator, dtype=F64) * head_scale
    scores[..., -3:] = PROTECTED + torch.arange(3, dtype=F64)  # a window of 3
    scores[1, :, :5] = float("-inf")  # left padding
    budget = torch.tensor([7, 9, 17])  # the padded sample has 12 tokens; the last keeps all
    for alpha in (0.0, 0.2, 0.5, 1.0):
        kept = HeadAdaptive(True, alpha).select(scores, budget)
        for sample in range(batch):
            rows = [[None if s == float("-inf") else s for s in row.tolist()] for row in scores[sample]]
            expected = literal_adakv(rows, int(budget[sample]), alpha)
            assert [set(torch.nonzero(row).flatten().tolist()) for row in kept[sample]] == expected
            assert int(kept[sample].sum()) == heads * int(budget[sample])
    # alpha = 1: every head keeps exactly the budget; alpha = 0: the scores alone split it
    assert torch.equal(HeadAdaptive(True, 1.0).select(scores, budget).sum(-1), budget[:, None].expand(batch, heads))
    assert len(set(HeadAdaptive(True, 0.0).select(scores, budget)[0].sum(-1).tolist())) > 1


@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_vl"])
def test_snapkv_head_adaptive_equals_the_literal_rule_on_the_attention_maps(tiny_dirs, processors, arch):
    inputs = image_inputs(processors[arch])
    n = inputs["input_ids"].shape[1]
    window, alpha = 6, 0.2
    maps, groups = attention_maps(tiny_dirs[arch], inputs)
    model = vlmcompress.load(tiny_dirs[arch], kv="snapkv", kv_budget=0.3, window_size=window, kernel_size=5,
                             head_adaptive=True, head_adaptive_floor=alpha, dtype=F64)
    cache = model.make_cache()
    with torch.no_grad():
        model(**inputs, past_key_values=cache)
    budget = round_half_up(0.3 * n)
    uneven = False
    for layer, attention in zip(cache.layers, maps):
        per_head = [[pooled[j] for j in range(n - window)] + [PROTECTED + j for j in range(n - window, n)]
                    for pooled in snapkv_scores(attention, groups, n, window, 5)]
        assert kept_sets(layer) == literal_adakv(per_head, budget, alpha)
        uneven |= len(set(layer.live_tokens()[0].tolist())) > 1
    assert uneven, "the heads must keep different numbers of tokens somewhere"


@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_vl"])
def test_h2o_head_adaptive_equals_the_literal_rule_on_the_attention_maps(tiny_dirs, processors, arch):
    inputs = image_inputs(processors[arch])
    n = inputs["input_ids"].shape[1]
    maps, groups = attention_maps(tiny_dirs[arch], inputs)
    model = load(tiny_dirs[arch], "h2o", 0.3, dtype=F64)
    cache = model.make_cache()
    with torch.no_grad():
        model(**inputs, past_key_values=cache)
    budget = round_half_up(0.3 * n)
    recent = max(1, math.floor(budget * 0.5))
    for layer, attention in zip(cache.layers, maps):
        # accumulated attention of key j: the sum over every query i of A[i, j], the recent tokens protected
        accumulated = [[sum(float(attention[h, i, j]) for i in range(n)) for j in range(n)]
                       for h in range(attention.shape[0])]
        per_head = [[score if j < n - recent else PROTECTED + j
                     for j, score in enumerate(mean_over_group(accumulated, kv_head, groups))]
                    for kv_head in range(attention.shape[0] // groups)]
        assert kept_sets(layer) == literal_adakv(per_head, budget, 0.2)


@pytest.mark.parametrize("arch, method", CASES)
def test_eviction_equals_masking_per_head(tiny_dirs, processors, arch, method):
    """Decoding from the ragged cache gives the logits of the full model whose attention masks out exactly the
    evicted (head, position) pairs."""
    inputs = image_inputs(processors[arch])
    prompt = inputs["input_ids"].shape[1]
    model = load(tiny_dirs[arch], method, 0.25, dtype=F64)
    cache = model.make_cache()
    sequences, logits = generate_with_raw_logits(model, inputs, new_tokens=3, past_key_values=cache)
    assert all(isinstance(layer, RaggedLayer) for layer in cache.layers)
    assert any(len(set(layer.live_tokens()[0].tolist())) > 1 for layer in cache.layers), "heads must differ"
    # a head's -1 padding points at the first generated position, which every head attends anyway
    kept = [layer.kept_indices.masked_fill(layer.kept_indices < 0, prompt) for layer in cache.layers]
    reference_sequences, reference_logits = masked_reference_logits(tiny_dirs[arch], inputs, kept, new_tokens=3)
    assert torch.equal(sequences, reference_sequences)
    for ours, reference in zip(logits, reference_logits):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-9)
    _, full_logits = generate_with_raw_logits(upstream_model(tiny_dirs[arch], dtype=F64), inputs, new_tokens=3)
    assert (logits[1] - full_logits[1]).abs().max() > 1e-6  # evicting changed the computation


def attended_this_step(layer: RaggedLayer) -> torch.Tensor:
    """`[b, h, live]` the positions a decoding step attends in each head (before its write): the held slots, the
    freed one taking the new token, or the new token after them; rows padded with the new token's position."""
    new = layer.seen_tokens
    held = layer.held()
    rows = []
    for segment, positions in enumerate(layer.positions.flatten(0, 1)):
        row = positions[held[segment]].tolist()
        if layer.free_slot is not None and bool(layer.over_capacity[segment]):
            row[int(layer.free_slot[segment])] = new
        else:
            row.append(new)
        rows.append(row)
    width = max(len(row) for row in rows)
    padded = torch.tensor([row + [new] * (width - len(row)) for row in rows])
    return padded.view(layer.batch, layer.kv_heads, width)


@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_vl"])
def test_h2o_evicts_per_head_while_decoding_and_equals_masking_at_every_step(tiny_dirs, processors, arch):
    """Each head stays at its own prefill count while decoding (its lowest-scored slot retired and overwritten),
    and each step's logits equal the full model's with exactly the (head, position) pairs not held masked."""
    inputs = image_inputs(processors[arch])
    model = load(tiny_dirs[arch], "h2o", 0.2, dtype=F64)
    cache = model.make_cache()
    attended = {}  # layer -> per decoding step, [b, h, live] positions attended

    def record(module, args, kwargs):
        if kwargs["hidden_states"].shape[1] == 1:
            attended.setdefault(module.layer_idx, []).append(attended_this_step(cache.layers[module.layer_idx]))

    handles = [layer.self_attn.register_forward_pre_hook(record, with_kwargs=True)
               for layer in model.model.language_model.layers]
    sequences, logits = generate_with_raw_logits(model, inputs, new_tokens=5, past_key_values=cache)
    for handle in handles:
        handle.remove()
    for layer in cache.layers:
        assert torch.equal(layer.live_tokens(), (layer.kept_indices >= 0).sum(-1))
        assert layer.free_slot is not None and int(layer.positions.max()) == layer.seen_tokens - 1
    assert any(len(set(layer.live_tokens()[0].tolist())) > 1 for layer in cache.layers), "heads must differ"
    # H2O's rule in each head: the freed slot holds the lowest accumulated score outside the recent tokens
    recent = math.floor(int(cache.layers[0].capacity[0]) * 0.5)
    for layer in cache.layers:
        newest = layer.seen_tokens - 1
        for segment, (positions, scores) in enumerate(zip(layer.positions.flatten(0, 1), layer.scores.flatten(0, 1))):
            candidates = [float(score) for position, score in zip(positions.tolist(), scores)
                          if 0 <= position <= newest - recent]
            assert float(scores[int(layer.free_slot[segment])]) == min(candidates)
    text = model.config.text_config
    segments, head_dim = len(cache.layers) * text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    # one token appended to each head at the first step, then written over retired slots: no more room used
    assert cache.nbytes() == cache.prefill_nbytes + segments * (1 + GROWTH) * 2 * head_dim * 8
    kept = [attended[i] for i in range(len(cache.layers))]
    reference_sequences, reference_logits = masked_reference_logits(tiny_dirs[arch], inputs, kept, new_tokens=5)
    assert torch.equal(sequences, reference_sequences)
    for step in range(5):
        torch.testing.assert_close(logits[step], reference_logits[step], rtol=0, atol=1e-9)


@pytest.mark.parametrize("arch, method, strategy", [("qwen2_vl", "snapkv", "pivotal"), ("internvl", "lookm", None)])
def test_merging_into_each_heads_kept_tokens_follows_the_formula(tiny_dirs, processors, arch, method, strategy):
    """`merge=` composes: each head's evicted tokens are merged into its own kept ones (`test_kv_merge`'s
    literal formula), and the ragged store holds the merged entries."""
    inputs = image_inputs(processors[arch])
    options = {"merge": strategy} if strategy else {}  # LOOK-M merges by default: pivotal
    model = vlmcompress.load(tiny_dirs[arch], kv=method, kv_budget=0.3, head_adaptive=True, dtype=F64,
                             **OPTIONS.get(method, {}), **options)
    cache = model.make_cache()
    greedy(model, inputs, new_tokens=1, past_key_values=cache)  # the prompt only: no token fed back
    for layer, (keys, values) in zip(cache.layers, prompt_keys_and_values(tiny_dirs[arch], inputs)):
        for head, kept in enumerate(kept_sets(layer)):
            start, length = int(layer.starts[head]), int(layer.lengths[head])
            expected_keys, expected_values = literal_merge("pivotal", keys[0, head], values[0, head], sorted(kept))
            torch.testing.assert_close(layer.keys[start:start + length], expected_keys, rtol=0, atol=1e-10)
            torch.testing.assert_close(layer.values[start:start + length], expected_values, rtol=0, atol=1e-10)
    assert any(len(set(layer.live_tokens()[0].tolist())) > 1 for layer in cache.layers), "heads must differ"


@pytest.mark.parametrize("arch, method", [(arch, "snapkv") for arch in ARCHITECTURES] + [("qwen2_vl", "h2o")])
def test_identity_at_full_budget(tiny_dirs, processors, arch, method):
    inputs = image_inputs(processors[arch])
    expected = greedy(upstream_model(tiny_dirs[arch]), inputs, new_tokens=8)
    assert torch.equal(greedy(load(tiny_dirs[arch], method, 1.0), inputs, new_tokens=8), expected)
    whole = inputs["input_ids"].shape[1] + 8  # H2O: every head may grow to it while decoding, so none evicts
    assert torch.equal(greedy(load(tiny_dirs[arch], method, whole), inputs, new_tokens=8), expected)


@pytest.mark.parametrize("arch, method", [("qwen2_vl", "snapkv"), ("llava_onevision", "vlcache"),
                                          ("internvl", "pyramidkv"), ("qwen2_vl", "h2o")])
@pytest.mark.parametrize("batch", ["image and shorter text-only", "one and two images"])
def test_batch_equals_single(tiny_dirs, processors, arch, method, batch):
    """Tokens and logits, and each head's kept positions and counts (padding never kept)."""
    model = load(tiny_dirs[arch], method, 0.3, dtype=F64)
    batch_cache, pads, single_caches = assert_batch_equals_single(model, processors[arch], BATCHES[batch], 4)
    for i, single_cache in enumerate(single_caches):
        for batch_layer, single_layer in zip(batch_cache.layers, single_cache.layers):
            assert kept_sets(batch_layer, i, shift=int(pads[i])) == kept_sets(single_layer)
            assert torch.equal(batch_layer.live_tokens()[i], single_layer.live_tokens()[0])


@pytest.mark.parametrize("method, budget", [("snapkv", 0.2), ("pyramidkv", 0.3), ("vlcache", 24)])
def test_the_budget_is_the_budget(tiny_dirs, processors, method, budget):
    """Each layer keeps exactly kv_heads x its budget (the allocation's, split over the heads), and holds exactly
    those tokens' bytes; after a decoding step, those plus one token and GROWTH slots of room per head."""
    arch = "llava_onevision"
    inputs = image_inputs(processors[arch], ("What is in the picture? Describe it.", "Colour?"), seeds=[3, 4])
    real = inputs["attention_mask"].sum(-1).tolist()
    model = load(tiny_dirs[arch], method, budget)
    uniform = vlmcompress.load(tiny_dirs[arch], kv=method, kv_budget=budget, **OPTIONS[method])
    cache, uniform_cache = model.make_cache(), uniform.make_cache()
    model(**inputs, past_key_values=cache)  # prefill only
    uniform(**inputs, past_key_values=uniform_cache)
    text = model.config.text_config
    heads, head_dim = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    per_token = 2 * head_dim * 4  # a key and a value in float32
    widest = [0] * len(cache.layers)  # per layer, the largest sample budget
    for sample, length in enumerate(real):
        mean = expected_kept(budget, length)
        # the layers' budgets are the uniform cache's (the allocation over layers), split over the heads
        layer_budgets = [int(layer.live_tokens()[sample, 0]) for layer in uniform_cache.layers]
        assert sum(layer_budgets) == mean * len(layer_budgets)
        widest = [max(pair) for pair in zip(widest, layer_budgets)]
        for layer, layer_budget in zip(cache.layers, layer_budgets):
            assert int(layer.live_tokens()[sample].sum()) == heads * layer_budget
    held = sum(int(layer.live_tokens().sum()) for layer in cache.layers)
    assert cache.nbytes() == cache.prefill_nbytes == held * per_token
    for layer in cache.layers:  # really freed: each store owns exactly its tokens' storage
        assert layer.keys.untyped_storage().nbytes() == layer.keys.numel() * layer.keys.element_size()
    decoded = model.make_cache()
    greedy(model, inputs, new_tokens=2, past_key_values=decoded)  # one token fed back to every head
    segments = len(cache.layers) * 2 * heads
    assert decoded.nbytes() == (held + segments * (1 + GROWTH)) * per_token
    assert model.compression_stats["kv_bytes"] == held * per_token
    assert model.compression_stats["kept_tokens_per_layer"] == widest


def test_the_store_grows_in_steps_of_room_and_keeps_every_token():
    """Many decoding steps: every segment holds its kept tokens then each step's token, in order, and the store
    is reallocated only when the room runs out."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, n, dim = 2, 3, 9, 4
    keys, values = (torch.randn(batch, heads, n, dim, generator=generator) for _ in range(2))
    kept = torch.rand(batch, heads, n, generator=generator) < 0.5
    kept[..., 0] = True
    layer = RaggedLayer.from_selection(keys, values, kept, seen_tokens=n)
    steps = [torch.randn(batch, heads, 1, dim, generator=generator) for _ in range(GROWTH + 5)]
    reallocations = 0
    for step in steps:
        before = layer.keys.data_ptr()
        layer.decode_mask(RAGGED_ATTENTION, 1, 1, torch.float32)
        layer.update(step, -step)
        reallocations += layer.keys.data_ptr() != before
    assert reallocations == 2 and layer.seen_tokens == n + len(steps)
    assert set(layer.host_room.tolist()) == {2 * (1 + GROWTH) - len(steps)}
    lengths = layer.lengths.tolist()
    for segment, (start, length) in enumerate(zip(layer.starts.tolist(), lengths)):
        b, h = divmod(segment, heads)
        expected = torch.cat([keys[b, h][kept[b, h]]] + [step[b, h] for step in steps])
        assert torch.equal(layer.keys[start:start + length], expected)
        assert torch.equal(layer.values[start:start + length][-1], -steps[-1][b, h, 0])
    assert layer.keys.shape[0] == sum(lengths) + int(layer.host_room.sum())


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ragged_attention_equals_masked_sdpa(q_len, dtype, device):
    """Segments of different lengths (the last q_len tokens of each are the step's, causal among themselves)
    against SDPA over the same tokens padded and masked per head."""
    generator = torch.Generator().manual_seed(q_len)
    batch, kv_heads, groups, dim = 2, 3, 4, 8
    lengths = torch.randint(q_len, 11, (batch * kv_heads,), generator=generator)
    room = 2  # unfilled slots after each segment
    starts = (lengths + room).cumsum(0) - (lengths + room)
    store_k = torch.randn(int((lengths + room).sum()), dim, generator=generator, dtype=dtype)
    store_v = torch.randn(int((lengths + room).sum()), dim, generator=generator, dtype=dtype)
    query = torch.randn(batch, kv_heads * groups, q_len, dim, generator=generator, dtype=dtype)
    segments = RaggedSegments(starts.to(device), lengths.to(device), int(lengths.max()), q_len)
    out = ragged_attention(query.to(device), store_k.to(device), store_v.to(device), segments, dim ** -0.5).cpu()
    width = int(lengths.max())
    keys = torch.zeros(batch * kv_heads, width, dim, dtype=dtype)
    values = torch.zeros_like(keys)
    allowed = torch.zeros(batch * kv_heads, q_len, width, dtype=torch.bool)
    for segment, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        keys[segment, :length] = store_k[start:start + length]
        values[segment, :length] = store_v[start:start + length]
        for i in range(q_len):
            allowed[segment, i, : length - q_len + i + 1] = True

    def expand(per_segment):  # [b * kv_heads, ...] -> [b, heads, ...]
        return per_segment.view(batch, kv_heads, *per_segment.shape[1:]).repeat_interleave(groups, dim=1)

    reference = torch.nn.functional.scaled_dot_product_attention(query, expand(keys), expand(values),
                                                                 attn_mask=expand(allowed))
    torch.testing.assert_close(out, reference.transpose(1, 2), rtol=1e-5, atol=1e-5)


@CUDA
@pytest.mark.parametrize("method", ["snapkv", "h2o"])
def test_on_cuda_decoding_equals_the_cpu(tiny_dirs, processors, method):
    """A padded batch decoded on the GPU for 40 steps (the stores grow twice; H2O retires a slot per head and
    step) gives the CPU's tokens and logits."""
    inputs = image_inputs(processors["qwen2_vl"], ("What is in the picture? Describe it.", "Colour?"), seeds=[3, 4])
    results = {}
    for device in ("cpu", "cuda"):
        model = load(tiny_dirs["qwen2_vl"], method, 0.3, dtype=F64, device_map=device)
        results[device] = generate_with_raw_logits(model, inputs.to(device), 40, past_key_values=model.make_cache())
    (sequences, logits), (cuda_sequences, cuda_logits) = results["cpu"], results["cuda"]
    assert torch.equal(sequences, cuda_sequences.cpu())
    # float64 throughout but the rotary tables, which transformers computes in float32 and CPU and CUDA round
    # differently: the logits were up to 1.3e-5 apart on an H200 (the tokens must agree exactly)
    for ours, reference in zip(cuda_logits, logits):
        torch.testing.assert_close(ours.cpu(), reference, rtol=1e-4, atol=1e-4)


def test_streamingllm_refuses_it_naming_the_methods_that_take_it(tiny_dirs):
    with pytest.raises(ValueError, match=r"recency alone.*Methods that take it: \['h2o', 'lookm', 'pyramidkv', "
                                         r"'random', 'snapkv', 'vlcache'\]"):
        vlmcompress.load(tiny_dirs["qwen2_vl"], kv="streamingllm", head_adaptive=True)
    vlmcompress.load(tiny_dirs["qwen2_vl"], kv="streamingllm", head_adaptive=False)  # the default is accepted


@pytest.mark.parametrize("options, message", [
    ({"head_adaptive": "yes"}, "head_adaptive must be True or False"),
    ({"head_adaptive": True, "head_adaptive_floor": 1.5}, r"head_adaptive_floor must be in \[0, 1\]"),
    ({"head_adaptive": True, "head_adaptive_floor": -0.1}, r"head_adaptive_floor must be in \[0, 1\]"),
    ({"head_adaptive": True, "head_adaptive_floor": "0.2"}, r"head_adaptive_floor must be in \[0, 1\]"),
    ({"head_adaptive": True, "cuda_graphs": True}, "leave cuda_graphs unset"),
    ({"head_adaptive": True, "attn_implementation": "sdpa"}, "leave attn_implementation=None"),
])
def test_bad_options_are_refused_before_the_weights_load(tiny_dirs, options, message):
    with pytest.raises(ValueError, match=message):
        vlmcompress.load(tiny_dirs["qwen2_vl"], kv="snapkv", **options)


def test_a_plain_model_without_the_ragged_attention_is_told_which_to_use(tiny_dirs, processors):
    inputs = image_inputs(processors["qwen2_vl"])
    plain = upstream_model(tiny_dirs["qwen2_vl"], attn_implementation="sdpa")
    with pytest.raises(ValueError, match=f"attn_implementation={{'text_config': '{RAGGED_ATTENTION}'}}"):
        greedy(plain, inputs, past_key_values=SnapKVCache(0.3, window_size=4, head_adaptive=True))
    ragged = upstream_model(tiny_dirs["qwen2_vl"], attn_implementation={"text_config": RAGGED_ATTENTION})
    out = greedy(ragged, inputs, past_key_values=SnapKVCache(0.3, window_size=4, head_adaptive=True))
    assert torch.equal(out, greedy(load(tiny_dirs["qwen2_vl"], "snapkv", 0.3), inputs))
