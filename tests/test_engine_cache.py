"""The hf engine's generation cache and its reads from the device: one static KV cache serves batch after batch
(its memory stays where it is, a compiled decoding step is made once), the host reads device values a bounded
number of times per batch, and a row's text still does not depend on its batch."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from caictl.engines import SamplingParams, load_engine

# Mixed lengths, all within one cache length; some share a long start, which is copied into the cache.
SHARED = "A shared start, long enough to be computed once and copied into every row that has it. " * 4
TEXTS = [SHARED + "First.", "Short.", "A middle one, " * 5, SHARED + "Second, a little longer than the first.",
         "Tiny", "Another text " * 9, SHARED + "Third.", "A question?", "Fourth " * 12, "Fifth one.",
         SHARED + "Sixth, with a few more words in it.", "Seventh " * 3, "Eighth.", "Ninth " * 7, SHARED + "Tenth",
         "Eleventh.", "Twelfth " * 4, "Thirteenth, the last."]
KEYS = [str(i) for i in range(len(TEXTS))]
PARAMS = SamplingParams(max_new_tokens=6, temperature=1.0, seed=7)


def after_each_generate(engine, note) -> None:
    """Calls note(the cache it ran on) after each of the engine's generate() calls from now on."""
    generate = engine.lm.generate

    def noting(*args, **kwargs):
        output = generate(*args, **kwargs)
        note(kwargs[engine._cache_argument])
        return output

    engine.lm.generate = noting


@pytest.fixture(scope="module")
def alone(tiny_model) -> list[str]:
    """The text of each of TEXTS generated in a batch of its own."""
    single = load_engine("hf", str(tiny_model), batch_size=1)
    return [g.text for g in single.complete(TEXTS, PARAMS, KEYS)]


def test_one_cache_serves_every_batch_of_a_shape(tiny_model, alone):
    engine = load_engine("hf", str(tiny_model), batch_size=4)
    seen = []  # (cache, where its first layer's keys are): the caches stay referenced, so no address is reused
    after_each_generate(engine, lambda cache: seen.append((cache, cache.layers[0].keys.data_ptr())))
    texts = engine.complete(TEXTS[:12], PARAMS, KEYS[:12])
    assert len(seen) == 3
    assert all(cache is seen[0][0] and address == seen[0][1] for cache, address in seen)
    assert [g.text for g in texts] == alone[:12]


def test_a_compiled_decoding_step_is_made_once_for_batches_of_any_size(tiny_model, alone, monkeypatch):
    # The last batch (2 of 4 rows) is filled up with filler rows: it has the others' shape, so it takes the same
    # compiled step and the same cache. A backend that only counts the graphs it is given keeps the test fast.
    graphs, seen = [], []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    engine = load_engine("hf", str(tiny_model), batch_size=4, compile=True)
    engine_config = engine._compile_config

    def compile_config():
        config = engine_config()
        config.backend = counting_backend
        return config

    monkeypatch.setattr(engine, "_compile_config", compile_config)
    after_each_generate(engine, lambda cache: seen.append((len(graphs), cache, cache.layers[0].keys.data_ptr())))
    torch._dynamo.reset()
    try:
        texts = [g.text for g in engine.complete(TEXTS, PARAMS, KEYS)]
        # A prompt longer than the cache gets a longer one, which then serves the short prompts too.
        engine.complete(["A long prompt. " * 80], PARAMS, ["long"])
        short = [g.text for g in engine.complete(TEXTS[:4], PARAMS, KEYS[:4])]
    finally:
        torch._dynamo.reset()
    assert len(seen) == 7
    counts = [count for count, _, _ in seen]
    assert counts[0] >= 1 and counts[:5] == counts[:1] * 5, counts  # nothing compiled after the first batch
    assert all(cache is seen[0][1] and address == seen[0][2] for _, cache, address in seen[:5])
    assert seen[6][1] is seen[5][1] is not seen[0][1] and seen[6][2] == seen[5][2] and counts[6] == counts[5]
    assert texts == alone and short == alone[:4]


class DeviceReads(TorchDispatchMode):
    """Counts what makes the host wait for the device when the device is a GPU: reading a value (item(),
    float(), a tensor's truth), nonzero() and boolean-mask indexing (their sizes), tolist(), cpu(), numpy(). On the
    CPU these are counted all the same."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.patches = [mock.patch.object(torch.Tensor, name, self.counted(getattr(torch.Tensor, name)))
                        for name in ("tolist", "cpu", "numpy")]

    def counted(self, method):
        def counting(tensor, *args, **kwargs):
            self.count += 1
            return method(tensor, *args, **kwargs)
        return counting

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        if func in (aten._local_scalar_dense.default, aten.nonzero.default) or (
                func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])):
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for patch in self.patches:
            patch.start()
        return super().__enter__()

    def __exit__(self, *exception):
        for patch in self.patches:
            patch.stop()
        return super().__exit__(*exception)


def reads_per_call(monkeypatch, owner, name: str) -> list[int]:
    """The device reads in each call of owner.name from now on."""
    counts, method = [], getattr(owner, name)

    def counted(*args, **kwargs):
        with DeviceReads() as reads:
            result = method(*args, **kwargs)
        counts.append(reads.count)
        return result

    monkeypatch.setattr(owner, name, counted)
    return counts


def test_keeping_a_batch_s_prompts_reads_the_device_once_however_many_rows(tiny_model, monkeypatch):
    engine = load_engine("hf", str(tiny_model), batch_size=8)
    long = [f"Prompt {i}: a request long enough to be kept for the next batch to continue. " * 2 for i in range(6)]
    counts = reads_per_call(monkeypatch, engine.prefixes, "keep_prompts")
    engine.complete(long[:2], PARAMS, KEYS[:2])
    engine.complete(long, PARAMS, KEYS[:6])
    assert len(engine.prefixes.last_prompts) == 6
    assert counts[0] == counts[1] <= 1, counts


def test_choice_log_probs_read_the_device_a_fixed_number_of_times_per_batch(tiny_model, monkeypatch):
    engine = load_engine("hf", str(tiny_model), batch_size=16)  # every call below is one batch
    counts = reads_per_call(monkeypatch, engine, "choice_logprobs")
    texts = [f"Question {i}: which is better?" for i in range(6)]
    for choices in ([" (A", " (B"], [" yes", " no, not at all"]):  # read at the final position; a row each
        few, many = engine.choice_logprobs(texts[:2], choices), engine.choice_logprobs(texts, choices)
        assert many.logprobs[:2] == [pytest.approx(row, abs=1e-5) for row in few.logprobs]
    assert counts[0] == counts[1] <= 1 and counts[2] == counts[3] <= 1, counts


@pytest.mark.parametrize("batch_size", [3, 5])
def test_batches_of_mixed_lengths_give_each_row_the_text_it_gets_alone(tiny_model, alone, batch_size, monkeypatch):
    engine = load_engine("hf", str(tiny_model), batch_size=batch_size)
    written, write = [], engine.prefixes._write_prefixes
    monkeypatch.setattr(engine.prefixes, "_write_prefixes", lambda *args: written.append(write(*args)))
    assert [g.text for g in engine.complete(TEXTS, PARAMS, KEYS)] == alone
    assert written  # a batch's shared start was copied into the reused cache, after batches that had none
