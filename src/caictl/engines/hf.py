"""In-process transformers engine: batched, left-padded, batches built from prompts of similar length.

Requests that start with the same tokens (few-shot examples, a shared system prompt) share that prefix's
KV cache: it is computed once, kept in a small LRU, and copied into every row that starts with it. Rows are
batched in token order for that, so rows with the same prefix land in the same batch. The last batch's prompts
keep their KV until the next batch, so a request that continues one of them starts from it.

Message content is data (caictl.data.control_text): chat_prompt() marks any control token inside content, and every
text is tokenized by a ContentEncoder, which reads marked tokens as text and everything else as the tokenizer does. BOS:
the template's, else the tokenizer's own setting, never two. Generation stops at every id in the model's
generation_config.eos_token_id (Llama 3: <|eot_id|>, <|eom_id|>, <|end_of_text|>), not only the tokenizer's eos.

Sampling uses the Gumbel-max trick: argmax(logits / T + Gumbel noise) is an exact sample from softmax(logits / T).
The noise is a hash of (the row's seed, from its request key; the step; the token), made on the model's device
(gumbel_noise). It makes a row's text independent of which other rows share its batch, which plain
`do_sample=True` (one global RNG) does not.
"""

from __future__ import annotations

import contextlib
import inspect
from bisect import bisect_right

from caictl.data import control_text as tokens
from caictl.engines.base import Generation, SamplingParams, cut_at_stop, request_seed
from caictl.errors import CaictlError, UsageError


class HFEngine:
    name = "hf"

    def __init__(self, model: str, batch_size: int = 16, device: str = "auto", dtype: str = "auto",
                 weights: bool = True, compile: bool | None = None, lm=None):
        """weights=False: the tokenizer side only (what the model would be fed, for `caictl inspect`); nothing
        that runs the model works. compile: decoding steps through torch.compile (over the static KV cache
        generation always uses); None: on with CUDA, off elsewhere (on a CPU, compiling takes longer than the
        steps it speeds up). lm: `model` already loaded (PPO's frozen reference), run where and as it is instead of
        loading another copy; device and dtype are then its own."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        from caictl.ui import quiet_transformers

        quiet_transformers()

        self.model_name = self.model = model
        self.batch_size = batch_size
        if lm is not None:
            device = str(next(lm.parameters()).device)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.compile = self.device.startswith("cuda") if compile is None else compile
        if dtype == "auto":
            bf16 = self.device.startswith("cuda") and torch.cuda.is_bf16_supported()
            dtype = "bfloat16" if bf16 else "float32"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            if lm is not None:
                self.lm = lm
                model_config, generation_config = lm.config, lm.generation_config
            elif weights:
                self.lm = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
                self.lm.to(self.device).eval()
                model_config, generation_config = self.lm.config, self.lm.generation_config
            else:
                self.lm, model_config = None, AutoConfig.from_pretrained(model)
                generation_config = GenerationConfig.from_model_config(model_config)
                with contextlib.suppress(OSError):  # a folder without generation_config.json keeps the model's
                    generation_config = GenerationConfig.from_pretrained(model)
        except OSError as error:
            raise UsageError(
                f"cannot load model {model!r} ({str(error).splitlines()[0]}); pass a local model folder or a "
                "hub id that is cached here (offline: caictl init-model --preset tiny --out models/tiny)"
            )
        self.tokenizer.padding_side = "left"
        self.tokenizer.model_max_length = 10**9  # too-long prompts are cut by _fit, not by a warning
        # Every end-of-turn id: the tokenizer's eos and the model's generation_config list (Llama 3 stops on three).
        stops = getattr(generation_config, "eos_token_id", None)
        stops = stops if isinstance(stops, (list, tuple)) else [stops]
        self.stop_ids = list(dict.fromkeys(i for i in [self.tokenizer.eos_token_id, *stops] if i is not None))
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Padding is masked out, so any id does where a tokenizer has neither pad nor eos (Llama 3 has no pad).
        self.pad_id = next((i for i in (self.tokenizer.pad_token_id, *self.stop_ids) if i is not None), 0)
        self.encoder = tokens.ContentEncoder(self.tokenizer, self.stop_ids)
        self.max_positions = getattr(model_config, "max_position_embeddings", None) or 4096
        self.choice_cuts: list[int] = []  # per text of the last choice_logprobs call, tokens cut to fit
        self._prefix_cache: dict[tuple[int, ...], list] = {}  # prefix tokens -> per-layer KV, oldest first
        self._last_prompts: dict[tuple[int, ...], list] = {}  # the last batch's prompts -> their per-layer KV
        # transformers renamed `past_key_values` to `cache` during 5.x; use whichever this version takes.
        if self.lm is not None:
            parameters = inspect.signature(self.lm.forward).parameters
            self._cache_argument = "cache" if "cache" in parameters else "past_key_values"

    def supports_chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def generate(self, chats: list[list[dict]], params: SamplingParams, keys: list[str]) -> list[Generation]:
        if not self.supports_chat():
            raise UsageError(f"model {self.model!r} has no chat template; use --prompt-style transcript")
        return self._generate(self.encoder.encode([self.chat_prompt(chat) for chat in chats]), params, keys)

    def complete(self, texts: list[str], params: SamplingParams, keys: list[str]) -> list[Generation]:
        return self._generate(self.encoder.encode(texts), params, keys)

    def chat_prompt(self, chat: list[dict]) -> str:
        """The text the model sees for a chat, up to the open assistant turn (its own template). Control tokens
        inside content come back marked (caictl.data.control_text), so that this engine reads them as text; a chat
        without any is exactly the template's text."""
        return self.encoder.render(chat, add_generation_prompt=True)

    def choice_logprobs(self, texts: list[str], choices: list[str]) -> list[list[float]]:
        """Each choice is read as the tokens the model would produce after the text: text and choice are encoded
        together, and the choice's tokens are those that reach past the text (a SentencePiece tokenizer encodes
        " (A" alone as ["▁", "▁(", "A"] but after "is:" as ["▁(", "A"]; a token across the boundary counts, as
        the openai engine counts it). Choices that differ only in their last token (" (A" / " (B") cost one
        sequence per text: the common part is scored once and the last tokens are read from the same final
        position. Texts that start alike (a few-shot block; one conversation asked under several principles, in
        both orders) share that prefix's KV as generation does, so each shared part is computed once."""
        if not choices:
            self.choice_cuts = [0] * len(texts)
            return [[] for _ in texts]
        rows = self.choice_rows(texts, choices)
        self.choice_cuts = [0] * len(texts)
        for _, _, reads, cut in rows:
            for t, _, _ in reads:
                self.choice_cuts[t] = max(self.choice_cuts[t], cut)
        scores: list[list[float]] = [[0.0] * len(choices) for _ in texts]
        for batch in self._prefix_batches([row[0] for row in rows]):
            sums, last = self._score([rows[i][0] for i in batch], [rows[i][1] for i in batch])
            for row, index in enumerate(batch):
                for t, c, ending in rows[index][2]:
                    scores[t][c] = sums[row] + (float(last[row, ending]) if ending is not None else 0.0)
        return scores

    def choice_rows(self, texts: list[str], choices: list[str]) -> list[tuple[list[int], int, list[tuple], int]]:
        """What choice_logprobs feeds the model: (sequence, how many of its last tokens are scored, per
        (text, choice) read from it (text index, choice index, the choice's last token id read from the
        sequence's final position, or None when the choice's tokens are all in the sequence), and how many
        tokens were cut from the sequence's front to fit the context)."""
        full = self.encoder.encode_with_offsets([text + tokens.mark(choice) for text in texts for choice in choices])
        rows = []
        for t, text in enumerate(texts):
            length = len(tokens.unmark(text))
            encoded = full[t * len(choices):(t + 1) * len(choices)]
            sequences = [ids for ids, _ in encoded]
            starts = [bisect_right(offsets, length, key=lambda span: span[1]) for _, offsets in encoded]
            for choice, start, sequence in zip(choices, starts, sequences):
                if start == len(sequence):
                    raise UsageError(f"choice {choice!r} adds no token to the text it follows")
            head = sequences[0][:-1]
            if len(set(starts)) == 1 and head and all(s[:-1] == head for s in sequences):
                scored, kept = len(head) - starts[0], self._tail(head, self.max_positions - 1)
                rows.append((kept, min(scored, len(kept) - 1), [(t, c, s[-1]) for c, s in enumerate(sequences)],
                             len(head) - len(kept)))
            else:
                for c, (start, s) in enumerate(zip(starts, sequences)):
                    scored, kept = len(s) - start, self._tail(s, self.max_positions)
                    rows.append((kept, min(scored, len(kept) - 1), [(t, c, None)], len(s) - len(kept)))
        return rows

    # Internals ------------------------------------------------------------------------------------------

    def _score(self, rows: list[list[int]], scored: list[int]):
        """One forward pass over a batch of sequences: per row, the summed log-probs of its last `scored` tokens,
        and the log-probs at its final position. A row shares at most the tokens before those whose log-probs are
        read, so every position read is computed in this pass."""
        import torch
        from transformers import DynamicCache

        limits = [len(row) - n - 1 for row, n in zip(rows, scored)]
        ids, mask, cache, longest = self._prefilled(rows, limits, lambda _: DynamicCache(config=self.lm.config))
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        # Logits only where they are read: the scored tokens' positions, and the last one.
        keep = max(scored) + 1
        with torch.inference_mode():
            logits = self.lm(input_ids=ids[:, longest:], attention_mask=mask, position_ids=positions[:, longest:],
                             logits_to_keep=keep, **{self._cache_argument: cache}).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        # token t's log-prob is read at position t - 1; a row sums its last `scored` of them
        targets = ids[:, ids.shape[1] - keep + 1:]
        token_logprobs = logprobs[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        window = torch.arange(keep - 1, device=self.device)
        counts = torch.tensor(scored, device=self.device)
        sums = token_logprobs.masked_fill(window < (keep - 1 - counts).unsqueeze(1), 0.0).sum(1).tolist()
        return sums, logprobs[:, -1]

    def _fit(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Cut a too-long prompt from the front: few-shot examples go before the conversation does."""
        room = self.max_positions - max_new_tokens
        if room <= 0:
            raise UsageError(f"--max-new-tokens {max_new_tokens} leaves no room in a "
                             f"{self.max_positions}-token context")
        return self._tail(ids, room)

    def _tail(self, ids: list[int], room: int) -> list[int]:
        """The last `room` tokens; a BOS the sequence starts with stays first."""
        if len(ids) <= room:
            return ids
        if self.encoder.bos_id is not None and ids[0] == self.encoder.bos_id and room > 1:
            return ids[:1] + ids[len(ids) - room + 1:]
        return ids[-room:]

    def _generate(self, encoded: list[list[int]], params: SamplingParams, keys: list[str]) -> list[Generation]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        fitted = [self._fit(ids, params.max_new_tokens) for ids in encoded]
        cut = [len(ids) - len(kept) for ids, kept in zip(encoded, fitted)]
        encoded = fitted
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,  # sampling happens in _RowSampler, greedy picks its argmax
            eos_token_id=self.stop_ids or None,
            pad_token_id=self.pad_id,
            stop_strings=list(params.stop) or None,
            disable_compile=not self.compile,
            compile_config=self._compile_config(),
        )
        stops = torch.tensor(self.stop_ids, dtype=torch.long)
        results: list[Generation | None] = [None] * len(encoded)
        for batch in self._prefix_batches(encoded):
            rows = [encoded[i] for i in batch]
            processors = LogitsProcessorList()
            if params.temperature > 0:
                seeds = [request_seed(params.seed, keys[i]) for i in batch]
                processors.append(_RowSampler(params.temperature, params.top_p, seeds))
            inputs = self._batch_inputs(rows, params.max_new_tokens)
            try:
                with torch.inference_mode():
                    output = self.lm.generate(**inputs, generation_config=config, logits_processor=processors,
                                              tokenizer=self.tokenizer)
            except torch.OutOfMemoryError:
                raise CaictlError(f"out of memory at batch size {self.batch_size}; lower --batch-size")
            self._keep_prompts(rows, inputs["attention_mask"], inputs[self._cache_argument])
            new_tokens = output[:, inputs["input_ids"].shape[1]:].cpu()
            # A row ends at its first stop id (any of them); what follows is padding.
            is_stop = torch.isin(new_tokens, stops)
            ended = is_stop.any(1)
            ends = torch.where(ended, is_stop.int().argmax(1), new_tokens.shape[1]).tolist()
            new_tokens, ended = new_tokens.tolist(), ended.tolist()
            for row, index in enumerate(batch):
                results[index] = self._decode(new_tokens[row][:ends[row]], len(encoded[index]), ended[row], params)
                results[index].truncated_tokens = cut[index]
        return results

    def _compile_config(self):
        """transformers compiles generate()'s decoding step by itself on CUDA when the cache is static; elsewhere
        only when told to compile on every device."""
        if not self.compile or self.device.startswith("cuda"):
            return None
        from transformers import CompileConfig

        config = CompileConfig(mode="default")  # "reduce-overhead" means CUDA graphs
        config._compile_all_devices = True
        return config

    def _prefix_batches(self, sequences: list[list[int]]) -> list[list[int]]:
        """Indices in token order, so that requests sharing a prefix are batched together."""
        order = sorted(range(len(sequences)), key=lambda i: sequences[i])
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _batch_inputs(self, rows: list[list[int]], max_new_tokens: int) -> dict:
        """generate() inputs with a preallocated (static) KV cache that already holds each row's shared prefix
        (_prefilled). A static cache, because a dynamic one copies itself at every decoding step: at batch 32 and
        1,600 cached tokens that copy made a step 5x slower on CPU."""
        from transformers import StaticCache

        def static_cache(prompt_width: int):
            # Rounded up, so that a compiled model (GPU) sees few distinct cache shapes.
            return StaticCache(config=self.lm.config, max_cache_len=-(-(prompt_width + max_new_tokens) // 256) * 256)

        # Every row keeps a token of its own to compute.
        ids, mask, cache, _ = self._prefilled(rows, [len(row) - 1 for row in rows], static_cache)
        return {"input_ids": ids, "attention_mask": mask, self._cache_argument: cache}

    def _shared_lengths(self, rows: list[list[int]], limits: list[int]) -> list[int]:
        """Per row, how many of its first tokens come from a shared prefix's KV instead of being computed in the
        batch's pass. A row's candidate is the longest start it has in common with another row, a kept prefix
        or a prompt of the last batch, at most limits[i] tokens (none below SHARED_PREFIX_MIN_TOKENS); all rows
        are then capped at one bound, the cheapest (_cheapest_bound)."""
        import numpy

        if len(rows) < 2:
            return [0] * len(rows)
        arrays = [numpy.asarray(row) for row in rows]
        kept = [numpy.asarray(prefix) for prefix in (*self._prefix_cache, *self._last_prompts)]
        pairs = [[len(a) if i == j else _common_prefix_length(a, b) for j, b in enumerate(arrays)]
                 for i, a in enumerate(arrays)]
        in_kept = [max((_common_prefix_length(a, k) for k in kept), default=0) for a in arrays]
        common = []
        for i, row in enumerate(rows):
            length = min(max(in_kept[i], *(pairs[i][j] for j in range(len(rows)) if j != i)), limits[i])
            common.append(length if length >= SHARED_PREFIX_MIN_TOKENS else 0)
        return _cheapest_bound(rows, common, pairs, in_kept)

    def _prefilled(self, rows: list[list[int]], limits: list[int], make_cache):
        """A batch's token ids and attention mask, a cache (make_cache(the batch's width)) that holds each row's
        shared prefix, and the width of that shared region, where the tokens still to compute start.

        A row's shared prefix (_shared_lengths) comes from the LRU, a prompt of the last batch (_keep_prompts) or
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
                    key, value = row_states[layer] if row_states else self._no_prefix(states, layer)
                    filler = (0, 0, 0, longest - key.shape[2])  # pads the seq dimension of [1, heads, seq, dim]
                    keys.append(torch.nn.functional.pad(key, filler))
                    values.append(torch.nn.functional.pad(value, filler))
                cache.update(torch.cat(keys), torch.cat(values), layer, {"cache_position": positions})
        self._last_prompts = {}  # what this batch took from them is copied: free the rest before it runs
        return (torch.tensor(ids, device=self.device), torch.tensor(mask, device=self.device), cache, longest)

    @staticmethod
    def _no_prefix(states: list, layer: int):
        """An empty (zero-length) key and value, shaped like the other rows' (which are all filler)."""
        key, value = next(s for s in states if s)[layer]
        return key[:, :, :0], value[:, :, :0]

    def _prefix_states(self, prefix: tuple[int, ...]) -> list:
        """[(key, value)] per layer for a prefix, each [1, kv heads, len, head dim]; cached (LRU). Only the tokens
        past the longest start it shares with a kept sequence are computed: a conversation after a few-shot block
        computes its own tokens, not the block again."""
        import numpy
        import torch
        from transformers import DynamicCache

        for store in (self._prefix_cache, self._last_prompts):
            # The prefix itself, or a kept longer sequence that starts with it.
            for kept in (prefix, *(p for p in reversed(store) if p[:len(prefix)] == prefix)):
                if kept in store:
                    if store is self._prefix_cache:
                        store[kept] = store.pop(kept)  # most recently used goes last
                    return [(key[:, :, :len(prefix)], value[:, :, :len(prefix)]) for key, value in store[kept]]
        start, start_states, wanted = 0, None, numpy.asarray(prefix)
        for store in (self._prefix_cache, self._last_prompts):
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
                    logits_to_keep=1, **{self._cache_argument: cache})
        states = [(layer.keys, layer.values) for layer in cache.layers]
        self._prefix_cache[prefix] = states
        if len(self._prefix_cache) > PREFIX_CACHE_ENTRIES:
            self._prefix_cache.pop(next(iter(self._prefix_cache)))
        return states

    def _keep_prompts(self, rows: list[list[int]], attention_mask, cache) -> None:
        """Keeps each prompt's KV from the batch just run, until the next batch: a request that continues an earlier
        one starts from it (revise's revision request is its critique request, the critique and one more turn).
        A prompt's own positions are those its mask marks; filler and padding are left out. One batch only, freed
        once the next batch's cache holds what it takes: at most one batch's prompt KV more than before."""
        self._last_prompts = {}
        for i, row in enumerate(rows):
            if len(row) >= SHARED_PREFIX_MIN_TOKENS:
                mine = attention_mask[i].nonzero().squeeze(1)
                self._last_prompts[tuple(row)] = [(layer.keys[i:i + 1].index_select(2, mine),
                                                   layer.values[i:i + 1].index_select(2, mine))
                                                  for layer in cache.layers]

    def forget_prefixes(self) -> None:
        """Drops every kept KV, so that the next call computes all again (benchmarks start each run cold)."""
        self._prefix_cache.clear()
        self._last_prompts.clear()

    def _decode(self, tokens: list[int], prompt_tokens: int, ended: bool, params: SamplingParams) -> Generation:
        """tokens: the reply up to (without) its stop id; ended: whether a stop id came."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, params.stop)
        if stopped:
            # Generation ran a few tokens past the stop string before the criterion fired.
            count = len(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids)
        else:
            count = len(tokens) + (1 if ended else 0)
        finish = "stop" if ended or stopped else "length"
        return Generation(text, prompt_tokens, count, finish)


SHARED_PREFIX_MIN_TOKENS = 32  # below this, computing the prefix separately is not worth a second call
# A prefix computed in a call of its own costs about as much as this many more tokens in the batch's pass (one
# small pass of its own; measured on CPU, where a call on a few dozen tokens runs its matrix products slowly).
PREFIX_CALL_TOKENS = 128
PREFIX_CACHE_ENTRIES = 32  # prefixes kept: a constitution's few-shot variants, one per principle, fit


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


# The sampler's name, part of every sampling stage's resume settings: another sampler draws other text from a seed.
SAMPLER = "gumbel-hash32"


class _RowSampler:
    """Temperature and top-p, then Gumbel noise that is a function of (row's seed, step, token id) alone
    (gumbel_noise), made where the logits are: a row's text depends on nothing else in its batch, and no
    vocabulary-sized noise crosses from the CPU to a GPU at each step."""

    def __init__(self, temperature: float, top_p: float, seeds: list[int]):
        self.temperature = temperature
        self.top_p = top_p
        self.seeds = seeds
        self.step = 0

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            # Drop a token when the tokens before it already reach top_p; the first always stays.
            drop_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= self.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        seeds = torch.tensor(self.seeds, dtype=torch.int64, device=scores.device)
        noise = gumbel_noise(seeds, self.step, scores.shape[-1])
        self.step += 1
        return scores + noise


MASK32 = 0xFFFFFFFF


def gumbel_noise(seeds, step: int, vocabulary: int):
    """Standard Gumbel noise [rows, vocabulary] from a counter-based generator: entry (row, token) is a hash of
    (seeds[row], step, token), so it is the same whatever else is computed, on any device, in any batch.
    argmax(logits + noise) is then an exact sample from softmax(logits) (the Gumbel-max trick).

    The hash is Wellons' lowbias32 (two rounds over the counter mixed with a per-row, per-step key) in int64
    arithmetic that cannot overflow; 24 of its bits make a uniform in (0, 1), so the noise lies in about
    [-2.9, 17.3] rather than the Gumbel's unbounded range."""
    import torch

    low, high = seeds & MASK32, (seeds >> 32) & MASK32
    row_key = _lowbias32(_lowbias32(low ^ _lowbias32(high)) ^ _lowbias32(torch.full_like(low, step)))
    counters = torch.arange(vocabulary, dtype=torch.int64, device=seeds.device)
    bits = _lowbias32(_lowbias32(counters.unsqueeze(0) ^ row_key.unsqueeze(1)) ^ row_key.unsqueeze(1))
    uniform = ((bits >> 8).float() + 0.5) / 2**24
    return -torch.log(-torch.log(uniform))


def _lowbias32(x):
    """A 32-bit integer hash with good avalanche (Chris Wellons' lowbias32), on int64 tensors holding 32 bits."""
    x = x ^ (x >> 16)
    x = _times(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _times(x, 0x846CA68B)
    return x ^ (x >> 16)


def _times(x, constant: int):
    """x * constant mod 2**32 for 32-bit x, in two 16-bit halves so that no int64 product overflows."""
    return (x * (constant & 0xFFFF) + (((x * (constant >> 16)) & 0xFFFF) << 16)) & MASK32
