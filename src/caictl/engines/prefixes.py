"""Shared prefixes for the hf engine: rows that start with the same tokens take that start's KV from one pass.

Requests that start with the same tokens (few-shot examples, a shared system prompt) share that prefix's KV
cache: it is computed once, kept in a small LRU, and copied into every row that starts with it. Rows are batched
in token order for that (token_order_batches), so rows with the same prefix land in the same batch. The last
batch's prompts keep their KV until the next batch, so a request that continues one of them starts from it.

How much of each row to share is planned per batch (SharedPrefixes.prefilled): sharing a prefix costs a pass
of its own and can widen the batch, so a bound is chosen that costs least (_cheapest_bound).
"""

from __future__ import annotations

SHARED_PREFIX_MIN_TOKENS = 32  # below this, computing the prefix separately is not worth a second call
# A prefix computed in a call of its own costs about as much as this many more tokens in the batch's pass (one
# small pass of its own; measured on CPU, where a call on a few dozen tokens runs its matrix products slowly).
PREFIX_CALL_TOKENS = 128
PREFIX_CACHE_ENTRIES = 32  # prefixes kept: a constitution's few-shot variants, one per principle, fit


def token_order_batches(sequences: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices in token order, batch_size at a time, so that requests sharing a prefix are batched together."""
    order = sorted(range(len(sequences)), key=lambda i: sequences[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class SharedPrefixes:
    """The prefixes kept for one model, and the planner that decides what each batch takes from them."""

    def __init__(self, lm, device: str, pad_id: int, cache_argument: str):
        """lm: the model whose KV is kept; cache_argument: the name its forward() takes a cache under."""
        self.lm, self.device, self.pad_id, self.cache_argument = lm, device, pad_id, cache_argument
        self.kept: dict[tuple[int, ...], list] = {}  # prefix tokens -> per-layer KV, oldest first (LRU)
        self.last_prompts: dict[tuple[int, ...], list] = {}  # the last batch's prompts -> their per-layer KV

    def prefilled(self, rows: list[list[int]], limits: list[int], make_cache):
        """A batch's token ids and attention mask, a cache (make_cache(the batch's width)) that holds each row's
        shared prefix, and the width of that shared region, where the tokens still to compute start. Row i shares
        at most limits[i] tokens.

        A row's shared prefix (_shared_lengths) comes from the LRU, a prompt of the last batch (keep_prompts) or
        a call of its own. Row i's cache is its prefix's KV, then masked filler up to the longest prefix; its own
        tokens follow after masked padding. Positions come from the attention mask, so every row sees exactly
        what it would see alone.
        """
        import torch

        shared = self._shared_lengths(rows, limits)
        longest = max(shared)
        tails, pad = [row[n:] for row, n in zip(rows, shared)], self.pad_id
        width = max(len(t) for t in tails)
        ids = [row[:n] + [pad] * (longest - n + width - len(t)) + t for row, n, t in zip(rows, shared, tails)]
        mask = [[1] * n + [0] * (longest - n + width - len(t)) + [1] * len(t) for n, t in zip(shared, tails)]
        cache = make_cache(longest + width)
        if longest:
            states = [self._prefix_states(tuple(row[:n])) if n else None for row, n in zip(rows, shared)]
            positions = torch.arange(longest, device=self.device)
            for layer in range(self.lm.config.num_hidden_layers):
                keys, values = [], []
                for row_states in states:
                    key, value = row_states[layer] if row_states else _no_prefix(states, layer)
                    filler = (0, 0, 0, longest - key.shape[2])  # pads the seq dimension of [1, heads, seq, dim]
                    keys.append(torch.nn.functional.pad(key, filler))
                    values.append(torch.nn.functional.pad(value, filler))
                cache.update(torch.cat(keys), torch.cat(values), layer, {"cache_position": positions})
        self.last_prompts = {}  # what this batch took from them is copied: free the rest before it runs
        return (torch.tensor(ids, device=self.device), torch.tensor(mask, device=self.device), cache, longest)

    def keep_prompts(self, rows: list[list[int]], attention_mask, cache) -> None:
        """Keeps each prompt's KV from the batch just run, until the next batch: a request that continues an earlier
        one starts from it (revise's revision request is its critique request, the critique and one more turn).
        A prompt's own positions are those its mask marks; filler and padding are left out. One batch only, freed
        once the next batch's cache holds what it takes: at most one batch's prompt KV more than before."""
        self.last_prompts = {}
        for i, row in enumerate(rows):
            if len(row) >= SHARED_PREFIX_MIN_TOKENS:
                mine = attention_mask[i].nonzero().squeeze(1)
                self.last_prompts[tuple(row)] = [(layer.keys[i:i + 1].index_select(2, mine),
                                                  layer.values[i:i + 1].index_select(2, mine))
                                                 for layer in cache.layers]

    def forget(self) -> None:
        """Drops every kept KV, so that the next call computes all again (benchmarks start each run cold)."""
        self.kept.clear()
        self.last_prompts.clear()

    def _shared_lengths(self, rows: list[list[int]], limits: list[int]) -> list[int]:
        """Per row, how many of its first tokens come from a shared prefix's KV instead of being computed in the
        batch's pass. A row's candidate is the longest start it has in common with another row, a kept prefix
        or a prompt of the last batch, at most limits[i] tokens (none below SHARED_PREFIX_MIN_TOKENS); all rows
        are then capped at one bound, the cheapest (_cheapest_bound)."""
        import numpy

        if len(rows) < 2:
            return [0] * len(rows)
        arrays = [numpy.asarray(row) for row in rows]
        kept = [numpy.asarray(prefix) for prefix in (*self.kept, *self.last_prompts)]
        pairs = [[len(a) if i == j else _common_prefix_length(a, b) for j, b in enumerate(arrays)]
                 for i, a in enumerate(arrays)]
        in_kept = [max((_common_prefix_length(a, k) for k in kept), default=0) for a in arrays]
        common = []
        for i, row in enumerate(rows):
            length = min(max(in_kept[i], *(pairs[i][j] for j in range(len(rows)) if j != i)), limits[i])
            common.append(length if length >= SHARED_PREFIX_MIN_TOKENS else 0)
        return _cheapest_bound(rows, common, pairs, in_kept)

    def _prefix_states(self, prefix: tuple[int, ...]) -> list:
        """[(key, value)] per layer for a prefix, each [1, kv heads, len, head dim]; cached (LRU). Only the tokens
        past the longest start it shares with a kept sequence are computed: a conversation after a few-shot block
        computes its own tokens, not the block again."""
        import numpy
        import torch
        from transformers import DynamicCache

        for store in (self.kept, self.last_prompts):
            # The prefix itself, or a kept longer sequence that starts with it.
            for kept in (prefix, *(p for p in reversed(store) if p[:len(prefix)] == prefix)):
                if kept in store:
                    if store is self.kept:
                        store[kept] = store.pop(kept)  # most recently used goes last
                    return [(key[:, :, :len(prefix)], value[:, :, :len(prefix)]) for key, value in store[kept]]
        start, start_states, wanted = 0, None, numpy.asarray(prefix)
        for store in (self.kept, self.last_prompts):
            for kept, states in store.items():
                length = min(_common_prefix_length(wanted, numpy.asarray(kept)), len(prefix) - 1)
                if length > start and length >= SHARED_PREFIX_MIN_TOKENS:
                    start, start_states = length, states
        cache = DynamicCache(config=self.lm.config)
        for layer, (key, value) in enumerate(start_states or []):
            cache.update(key[:, :, :start], value[:, :, :start], layer)
        with torch.inference_mode():
            # Only the KV is wanted: one position of logits, not a vocabulary's worth for every prefix token.
            self.lm(input_ids=torch.tensor([list(prefix[start:])], device=self.device), use_cache=True,
                    logits_to_keep=1, **{self.cache_argument: cache})
        states = [(layer.keys, layer.values) for layer in cache.layers]
        self.kept[prefix] = states
        if len(self.kept) > PREFIX_CACHE_ENTRIES:
            self.kept.pop(next(iter(self.kept)))
        return states


def _common_prefix_length(a, b) -> int:
    """Tokens two id arrays have in common from the start."""
    n = min(len(a), len(b))
    differs = a[:n] != b[:n]
    return int(differs.argmax()) if differs.any() else n


def _cheapest_bound(rows: list[list[int]], common: list[int], pairs: list[list[int]], in_kept: list[int]) -> list[int]:
    """`common` capped at the bound that costs least: the batch's pass (rows x its widest tail) plus, for each
    distinct prefix not already kept, its new tokens and PREFIX_CALL_TOKENS for computing it in a call of its own.
    Sharing only widens a batch when its tail gets no narrower, and a prefix that only a row or two share (one
    principle, in both orders) is cheaper computed in the batch than in its own call. Ties go to the lower bound.
    pairs[i][j]: the tokens rows i and j have in common from the start; in_kept[i]: row i's with a kept prefix."""
    best_cost, best = None, common
    # Where rows' prefixes part: a few-shot block every row has, a conversation a few rows have, ...
    bounds = {0, *common, *(min(pairs[i][j], c) for i, c in enumerate(common) for j in range(len(rows)) if j != i)}
    for bound in sorted(b for b in bounds if b == 0 or b >= SHARED_PREFIX_MIN_TOKENS):
        shared = [min(c, bound) for c in common]
        cost = len(rows) * max(len(row) - n for row, n in zip(rows, shared))
        computed: list[int] = []  # rows whose prefix is computed first: later ones start from them
        for i, n in enumerate(shared):
            if not n or any(shared[r] == n and pairs[i][r] >= n for r in computed):
                continue  # nothing shared, or the same prefix as a row before
            start = max([min(in_kept[i], n)] + [min(pairs[i][r], n, shared[r]) for r in computed])
            if start < n:
                cost += n - start + PREFIX_CALL_TOKENS
            computed.append(i)
        if best_cost is None or cost < best_cost:
            best_cost, best = cost, shared
    return best


def _no_prefix(states: list, layer: int):
    """An empty (zero-length) key and value, shaped like the other rows' (which are all filler)."""
    key, value = next(s for s in states if s)[layer]
    return key[:, :, :0], value[:, :, :0]
