"""Which visual tokens of a prompt stay, once the pruning points have the scores: per sample, the projector-side
methods' selection over each image's tokens (its budget split over the images), and FastV's over the prompt."""

from __future__ import annotations

import torch

from ..pruning import allocate, fastv_keep, keep_count
from .pruning_layout import run_lengths
from .vision_adapter import TokenMaps


def segments_of(maps: dict[str, TokenMaps], input_ids: torch.Tensor, token_ids: dict[str, int],
                protected: torch.Tensor) -> list[list]:
    """Per sample, its images/videos as `(prompt columns, slice of the modality's token maps, TokenMaps)`; marks
    the maps' protected tokens in `protected` `[b, L]`."""
    segments: list[list] = [[] for _ in range(input_ids.shape[0])]
    for modality, tmap in maps.items():
        where = input_ids == token_ids[modality]
        positions = where.nonzero()  # row-major: the order features are scattered in
        if positions.shape[0] != tmap.scores.shape[0]:
            raise RuntimeError(
                f"{modality} tokens in the prompt ({positions.shape[0]}) differ from the tokens the projector "
                f"produced ({tmap.scores.shape[0]}): cannot map attention scores to prompt positions"
            )
        protected[where] = tmap.protected.to(protected.device)
        start = 0
        for length in tmap.lengths or run_lengths(where):
            rows = positions[start:start + length]
            if not bool((rows[:, 0] == rows[0, 0]).all()):
                raise RuntimeError("an image's tokens span two samples of the batch")
            segments[int(rows[0, 0])].append((rows[:, 1], slice(start, start + length), tmap))
            start += length
    return segments


def select_projector(spec, budget, options: dict, embeds: torch.Tensor, keep: torch.Tensor,
                     segments: list[list]) -> list[int]:
    """Run the projector-side method `spec` over each sample's segments: marks the kept tokens in `keep`
    `[b, L]`, writes merged features into `embeds` `[b, L, d]`, and returns the visual tokens each sample keeps."""
    kept_total = []
    for b, sample in enumerate(segments):
        prunable = [(~tm.protected[sl]) for _, sl, tm in sample]
        sizes = [int(p.sum()) for p in prunable]
        counts = [None] * len(sample) if budget is None else allocate(keep_count(budget, sum(sizes)), sizes)
        kept_here = 0
        for (cols, sl, tmap), free, count in zip(sample, prunable, counts):
            keep[b, cols[~free]] = True
            kept_here += int((~free).sum())
            free_cols = cols[free]
            if free_cols.numel() == 0:
                continue
            selection = spec.select(
                embeds[b, free_cols], tmap.scores[sl][free].to(embeds.device),
                tmap.keys[sl][free].to(embeds.device), keep=count, **options,
            )
            chosen = free_cols[selection.indices.to(free_cols.device)]
            keep[b, chosen] = True
            embeds[b, chosen] = selection.features.to(embeds.dtype)
            kept_here += chosen.numel()
        kept_total.append(kept_here)
    return kept_total


def select_fastv(attention: torch.Tensor, visual: torch.Tensor, protected: torch.Tensor,
                 budget) -> tuple[torch.Tensor, list[int]]:
    """FastV's keep mask `[b, L]` from the last token's attention `[b, L]`: every non-visual and protected token,
    and each sample's budget of its most attended visual tokens; and the visual tokens each sample keeps."""
    keep = ~visual | protected
    kept_total = []
    for b in range(attention.shape[0]):
        free = (visual[b] & ~protected[b]).nonzero().squeeze(-1)
        count = keep_count(budget, free.numel())
        if free.numel():
            chosen = free[fastv_keep(attention[b, free].to(torch.float64), count).to(free.device)]
            keep[b, chosen] = True
        kept_total.append(int((keep[b] & visual[b]).sum()))
    return keep, kept_total
