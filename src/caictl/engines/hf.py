"""In-process transformers engine: batched, left-padded, batches built from prompts of similar length.

This module loads the model and answers the engine protocol (caictl.engines.base). Requests that start with the
same tokens share that prefix's KV cache (caictl.engines.prefixes), and sampling is seeded per row by the
Gumbel-max trick (caictl.engines.sampling), so a row's text does not depend on what it was batched with.

Message content is data (caictl.data.control_text): chat_prompt() marks any control token inside content, and every
text is tokenized by a ContentEncoder, which reads marked tokens as text and everything else as the tokenizer does. BOS:
the template's, else the tokenizer's own setting, never two. Generation stops at every id in the model's
generation_config.eos_token_id (Llama 3: <|eot_id|>, <|eom_id|>, <|end_of_text|>), not only the tokenizer's eos;
nothing else of that config reaches generation (caictl.engines.base.only_stop_ids).
"""

from __future__ import annotations

import contextlib
import inspect
from bisect import bisect_right

from caictl.data import control_text as tokens
from caictl.engines.base import (
    NO_SAMPLING_FILTERS,
    ChoiceScores,
    Generation,
    SamplingParams,
    cut_at_stop,
    only_stop_ids,
    request_seed,
    stop_ids,
)
from caictl.engines.prefixes import SharedPrefixes, length_order_batches
from caictl.engines.sampling import RowSampler
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
        self.stop_ids = stop_ids(self.tokenizer, generation_config)
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Padding is masked out, so any id does where a tokenizer has neither pad nor eos (Llama 3 has no pad).
        self.pad_id = next((i for i in (self.tokenizer.pad_token_id, *self.stop_ids) if i is not None), 0)
        self.encoder = tokens.ContentEncoder(self.tokenizer, self.stop_ids)
        self.max_positions = getattr(model_config, "max_position_embeddings", None) or 4096
        # transformers renamed `past_key_values` to `cache` during 5.x; use whichever this version takes.
        forward = inspect.signature(self.lm.forward).parameters if self.lm is not None else {}
        self._cache_argument = "cache" if "cache" in forward else "past_key_values"
        self.prefixes = SharedPrefixes(self.lm, self.device, self.pad_id, self._cache_argument)
        self._cache, self._cache_shape = None, None  # generation's static KV cache, reused (_static_cache)

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

    def choice_logprobs(self, texts: list[str], choices: list[str]) -> ChoiceScores:
        """Each choice is read as the tokens the model would produce after the text: text and choice are encoded
        together, and the choice's tokens are those that reach past the text (a SentencePiece tokenizer encodes
        " (A" alone as ["▁", "▁(", "A"] but after "is:" as ["▁(", "A"]; a token across the boundary counts, as
        the openai engine counts it). Choices that differ only in their last token (" (A" / " (B") cost one
        sequence per text: the common part is scored once and the last tokens are read from the same final
        position. Texts that start alike (a few-shot block; one conversation asked under several principles, in
        both orders) share that prefix's KV as generation does, so each shared part is computed once. A text's cut
        is the most cut from any of its sequences."""
        if not choices:
            return ChoiceScores.uncut([[] for _ in texts])
        rows = self.choice_rows(texts, choices)
        cuts = [0] * len(texts)
        for _, _, reads, cut in rows:
            for t, _, _ in reads:
                cuts[t] = max(cuts[t], cut)
        scores: list[list[float]] = [[0.0] * len(choices) for _ in texts]
        for batch in length_order_batches([row[0] for row in rows], self.batch_size):
            reads = [(row, t, c, ending) for row, index in enumerate(batch) for t, c, ending in rows[index][2]]
            endings = [(row, ending) for row, _, _, ending in reads if ending is not None]
            sums, ending_logprobs = self._score([rows[i][0] for i in batch], [rows[i][1] for i in batch], endings)
            ending_logprobs = iter(ending_logprobs)
            for row, t, c, ending in reads:
                scores[t][c] = sums[row] + (next(ending_logprobs) if ending is not None else 0.0)
        return ChoiceScores(scores, cuts)

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

    def forget_prefixes(self) -> None:
        """Drops every kept KV and the cache generation reuses, so that the next call computes and allocates all
        again (benchmarks start each run cold) and their memory is free until then."""
        self.prefixes.forget()
        self._cache = self._cache_shape = None

    # Internals ------------------------------------------------------------------------------------------

    def _generate(self, encoded: list[list[int]], params: SamplingParams, keys: list[str]) -> list[Generation]:
        from transformers import GenerationConfig

        fitted = [self._fit(ids, params.max_new_tokens) for ids in encoded]
        cut = [len(ids) - len(kept) for ids, kept in zip(encoded, fitted)]
        encoded = fitted
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,  # sampling happens in RowSampler, greedy picks its argmax
            **NO_SAMPLING_FILTERS,  # and no processor runs before it (only_stop_ids keeps the model's out too)
            eos_token_id=self.stop_ids or None,
            pad_token_id=self.pad_id,
            stop_strings=list(params.stop) or None,
            disable_compile=not self.compile,
            compile_config=self._compile_config(),
        )
        results: list[Generation | None] = [None] * len(encoded)
        for batch in length_order_batches(encoded, self.batch_size):
            seeds = [request_seed(params.seed, keys[i]) for i in batch]
            # A batch's tensors are freed when _generate_batch returns, before the next batch's are made.
            generations = self._generate_batch([encoded[i] for i in batch], seeds, params, config)
            for index, generation in zip(batch, generations):
                generation.truncated_tokens = cut[index]
                results[index] = generation
        return results

    def _generate_batch(self, rows: list[list[int]], seeds: list[int], params: SamplingParams, config) -> list:
        """One batch through generate(), as many Generations as rows. Compiled, a batch always has batch_size rows
        (filler rows after the real ones, made to stop at once), so that every batch has the shape the compiled
        step was made for; eager, filler rows would only cost time."""
        import torch
        from transformers import LogitsProcessorList

        size = self.batch_size if self.compile and self.stop_ids else len(rows)  # filler rows end at a stop id
        processors = LogitsProcessorList()
        if params.temperature > 0:
            processors.append(RowSampler(params.temperature, params.top_p, seeds + [0] * (size - len(rows)),
                                         compile=self.compile))
        if size > len(rows):
            processors.append(_EndRowsFrom(len(rows), self.stop_ids[0]))
        inputs = self._batch_inputs(rows, params.max_new_tokens, size)
        try:
            with torch.inference_mode(), only_stop_ids(self.lm):
                output = self.lm.generate(**inputs, generation_config=config, logits_processor=processors,
                                          tokenizer=self.tokenizer)
        except torch.OutOfMemoryError:
            raise CaictlError(f"out of memory at batch size {self.batch_size}; lower --batch-size")
        self.prefixes.keep_prompts(rows, inputs["attention_mask"], inputs[self._cache_argument])
        new_tokens = output[:len(rows), inputs["input_ids"].shape[1]:].cpu()
        # A row ends at its first stop id (any of them); what follows is padding.
        is_stop = torch.isin(new_tokens, torch.tensor(self.stop_ids, dtype=torch.long))
        ended = is_stop.any(1)
        ends = torch.where(ended, is_stop.int().argmax(1), new_tokens.shape[1]).tolist()
        new_tokens, ended = new_tokens.tolist(), ended.tolist()
        return [self._decode(new_tokens[row][:ends[row]], len(ids), ended[row], params) for row, ids in enumerate(rows)]

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

    def _compile_config(self):
        """transformers compiles generate()'s decoding step by itself on CUDA when the cache is static; elsewhere
        only when told to compile on every device."""
        if not self.compile or self.device.startswith("cuda"):
            return None
        from transformers import CompileConfig

        config = CompileConfig(mode="default")  # "reduce-overhead" means CUDA graphs
        config._compile_all_devices = True
        return config

    def _batch_inputs(self, rows: list[list[int]], max_new_tokens: int, size: int | None = None) -> dict:
        """generate() inputs with a preallocated (static) KV cache that already holds each row's shared prefix
        (SharedPrefixes.prefilled); size: the batch's rows, filler rows included. A static cache, because a dynamic
        one copies itself at every decoding step: at batch 32 and 1,600 cached tokens that copy made a step 5x
        slower on CPU."""
        size = size or len(rows)

        def static_cache(prompt_width: int):
            return self._static_cache(size, prompt_width + max_new_tokens)

        # Every row keeps a token of its own to compute.
        ids, mask, cache, _ = self.prefixes.prefilled(rows, [len(row) - 1 for row in rows], static_cache, size)
        return {"input_ids": ids, "attention_mask": mask, self._cache_argument: cache}

    def _static_cache(self, rows: int, length: int):
        """An empty static KV cache for `rows` rows and at least `length` positions (rounded up to a multiple of
        256): the last batch's where it serves, emptied in place, so that its memory stays where it is and no second
        cache is allocated beside it. Compiled, a cache serves every batch with its rows and no more positions: the
        decoding step's CUDA graphs are recorded over the cache's memory, so a cache that only grows means a
        recording per length reached, not per batch (transformers' own generate() keeps its static cache so).
        Eager, a cache serves only batches of its very shape, since every decoding step attends over all of its
        positions. An old cache is dropped before a new one is allocated."""
        from transformers import StaticCache

        length = -(-length // 256) * 256
        if self._cache is not None and self._cache_shape[0] == rows:
            kept_length = self._cache_shape[1]
            if kept_length == length or (self.compile and kept_length > length):
                self._cache.reset()
                return self._cache
        self._cache = None  # the old cache's memory is free before the new one's is taken
        self._cache, self._cache_shape = StaticCache(config=self.lm.config, max_cache_len=length), (rows, length)
        return self._cache

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

    def _score(self, rows: list[list[int]], scored: list[int], endings: list[tuple[int, int]]):
        """One forward pass over a batch of sequences: per row, the summed log-probs of its last `scored` tokens;
        and per (row, token id) in `endings`, that token's log-prob at the row's final position. Both cross from
        the device together, once. A row shares at most the tokens before those whose log-probs are read, so every
        position read is computed in this pass."""
        import torch
        from transformers import DynamicCache

        limits = [len(row) - n - 1 for row, n in zip(rows, scored)]
        ids, mask, cache, longest = self.prefixes.prefilled(rows, limits,
                                                            lambda _: DynamicCache(config=self.lm.config))
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
        sums = token_logprobs.masked_fill(window < (keep - 1 - counts).unsqueeze(1), 0.0).sum(1)
        read = torch.tensor(endings, dtype=torch.long, device=self.device).reshape(-1, 2)
        values = torch.cat([sums, logprobs[read[:, 0], -1, read[:, 1]]]).tolist()
        return values[:len(rows)], values[len(rows):]


class _EndRowsFrom:
    """A logits processor that makes rows `first` on (a batch's filler rows) pick `stop_id` at their first step:
    generate() then counts them finished, so that they never keep a batch decoding."""

    def __init__(self, first: int, stop_id: int):
        self.first, self.stop_id = first, stop_id

    def __call__(self, input_ids, scores):
        scores[self.first:] = float("-inf")
        scores[self.first:, self.stop_id] = 0.0
        return scores
