"""The in-process engine on the tiny model: batching does not change results, seeds do, scores are exact."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from caictl.engines import SamplingParams, load_engine
from caictl.errors import UsageError

CHATS = [[{"role": "user", "content": "Tell me a story about a lighthouse keeper and a storm."}],
         [{"role": "user", "content": "hi"}],
         [{"role": "user", "content": "What is {{x}} and {% raw %}?"}]]
KEYS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return load_engine("hf", str(tiny_model), batch_size=8)


def test_batched_sampling_equals_one_at_a_time(engine):
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=3)
    batched = [g.text for g in engine.generate(CHATS, params, KEYS)]
    engine.batch_size = 1
    try:
        single = [engine.generate([chat], params, [key])[0].text for chat, key in zip(CHATS, KEYS)]
    finally:
        engine.batch_size = 8
    assert batched == single
    assert len(set(batched)) == 3


def test_seed_and_key_decide_the_sample(engine):
    params = SamplingParams(max_new_tokens=24, seed=3)
    first = [g.text for g in engine.generate(CHATS, params, KEYS)]
    assert first == [g.text for g in engine.generate(CHATS, params, KEYS)]
    reseeded = SamplingParams(max_new_tokens=24, seed=4)
    assert first != [g.text for g in engine.generate(CHATS, reseeded, KEYS)]
    assert first[0] != engine.generate(CHATS[:1], params, ["other-key"])[0].text


def test_greedy_equals_argmax_of_the_model(engine):
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    text = "\n\nHuman: hello\n\nAssistant:"
    out = engine.complete([text], params, ["k"])[0]
    ids = engine.tokenizer(text).input_ids
    for _ in range(5):
        with torch.no_grad():
            logits = engine.lm(torch.tensor([ids])).logits[0, -1]
        next_id = int(logits.argmax())
        if next_id == engine.tokenizer.eos_token_id:
            break
        ids.append(next_id)
    expected = engine.tokenizer.decode(ids[len(engine.tokenizer(text).input_ids):], skip_special_tokens=True)
    assert out.text == expected


def test_token_counts_and_finish_reason(engine):
    out = engine.generate(CHATS, SamplingParams(max_new_tokens=8, seed=1), KEYS)
    for generation, chat in zip(out, CHATS):
        assert 0 < generation.completion_tokens <= 8
        assert generation.finish_reason in ("stop", "length")
        rendered = engine.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert generation.prompt_tokens == len(engine.tokenizer(rendered, add_special_tokens=False).input_ids)


def test_stop_strings_cut_the_text(engine):
    params = SamplingParams(max_new_tokens=40, seed=0)
    free = engine.complete(["Once upon a time"], params, ["s"])[0].text
    assert len(free) > 4
    stop = free[2:4]
    cut = engine.complete(["Once upon a time"], SamplingParams(max_new_tokens=40, seed=0, stop=(stop,)), ["s"])[0]
    assert stop not in cut.text and free.startswith(cut.text) and cut.finish_reason == "stop"


def test_choice_logprobs_match_a_direct_computation(engine):
    texts = ["The answer is:", "Which is better? The answer is:"]
    choices = [" (A)", " (B)"]
    scores = engine.choice_logprobs(texts, choices).logprobs
    tokenizer = engine.tokenizer
    for text, row in zip(texts, scores):
        for choice, score in zip(choices, row):
            prefix = tokenizer(text).input_ids
            ids = prefix + tokenizer(choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logprobs = torch.log_softmax(engine.lm(torch.tensor([ids])).logits[0].float(), -1)
            direct = sum(float(logprobs[i - 1, ids[i]]) for i in range(len(prefix), len(ids)))
            assert score == pytest.approx(direct, abs=1e-4)


def test_shared_prefixes_are_computed_once_and_change_nothing(tiny_model):
    # Few-shot requests: a long common start, two rows that share more, one row that shares nothing.
    shots = [{"role": "user", "content": "An example question about safety " * 8},
             {"role": "assistant", "content": "An example answer that is careful " * 8}]
    principle = [{"role": "user", "content": "A principle's own example " * 10},
                 {"role": "assistant", "content": "Its worked answer " * 10}]
    chats = [shots + principle + [{"role": "user", "content": "first"}],
             shots + principle + [{"role": "user", "content": "second, a little longer"}],
             shots + [{"role": "user", "content": "third"}],
             [{"role": "user", "content": "no examples at all"}]]
    keys = ["1", "2", "3", "4"]
    params = SamplingParams(max_new_tokens=16, seed=5)
    batched = load_engine("hf", str(tiny_model), batch_size=8)
    together = [g.text for g in batched.generate(chats, params, keys)]
    assert len(batched.prefixes.kept) >= 1  # the shared start was computed once and kept
    alone = load_engine("hf", str(tiny_model), batch_size=1)
    separate = [g.text for g in alone.generate(chats, params, keys)]
    assert not alone.prefixes.kept  # one row at a time shares nothing
    assert together == separate
    # A second call finds the prefixes in the cache and still gives the same texts.
    assert [g.text for g in batched.generate(chats, params, keys)] == together


def _alone(tiny_model, texts, params, keys) -> list[str]:
    single = load_engine("hf", str(tiny_model), batch_size=1)
    return [g.text for g in single.complete(texts, params, keys)]


def test_a_batch_is_no_wider_than_its_longest_row_when_sharing_would_widen_it(tiny_model):
    # Two rows share a long start, a third shares nothing and is longer than either. Sharing the start would
    # make the batch (shared start + the third row) wide: every row then decodes over filler.
    engine = load_engine("hf", str(tiny_model), batch_size=8)
    start = "A shared start that two rows have in common. " * 6
    texts = [start + "one", start + "two", "A long text of its own that shares nothing with the others. " * 12]
    rows = engine.encoder.encode(texts)
    assert len(rows[0]) < len(rows[2])
    inputs = engine._batch_inputs(rows, max_new_tokens=8)
    assert inputs["input_ids"].shape[1] == max(len(row) for row in rows)
    params, keys = SamplingParams(max_new_tokens=12, seed=2), ["1", "2", "3"]
    assert [g.text for g in engine.complete(texts, params, keys)] == _alone(tiny_model, texts, params, keys)


def test_a_kept_prefix_serves_rows_that_share_only_part_of_it(tiny_model):
    # A revise run written batch by batch: a principle's few-shot start was kept from an earlier batch, and a
    # row of the next batch has it although no neighbour in its own batch does.
    engine = load_engine("hf", str(tiny_model), batch_size=8)
    shots = "An example question about safety, and its careful answer. " * 5
    principle = "A principle's own worked example, long enough to matter. " * 5
    params = SamplingParams(max_new_tokens=12, seed=4)
    engine.complete([shots + principle + "first", shots + principle + "second"], params, ["a", "b"])
    kept = len(engine.prefixes.kept)
    texts = [shots + principle + "third", shots + "fourth"]
    rows = engine.encoder.encode(texts)
    inputs = engine._batch_inputs(rows, max_new_tokens=12)
    shared = len(engine.encoder.encode([shots + principle])[0]) - 1  # the kept start, up to the differing word
    assert inputs[engine._cache_argument].get_seq_length() >= shared
    assert len(engine.prefixes.kept) == kept  # read from what was kept, nothing computed again
    together = [g.text for g in engine.complete(texts, params, ["c", "d"])]
    assert together == _alone(tiny_model, texts, params, ["c", "d"])


def test_a_request_that_continues_one_of_the_last_batch_starts_from_its_kv(tiny_model):
    # revise's revision request is its critique request, the critique and one more turn: the critique
    # request's KV, kept from the batch before, saves computing it again.
    engine = load_engine("hf", str(tiny_model), batch_size=8)
    firsts = ["A first request about gardens, long enough to be worth keeping around. " * 2,
              "Quite another request, on trains and timetables, also long enough to keep. " * 5]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=6)
    engine.complete(firsts, params, ["a", "b"])
    # What is kept is each prompt's own KV, as the prompt alone gives it (the shorter one was padded).
    for row in engine.encoder.encode(firsts):
        alone = DynamicCache(config=engine.lm.config)
        with torch.no_grad():
            engine.lm(input_ids=torch.tensor([row]), use_cache=True, **{engine._cache_argument: alone})
        kept = engine.prefixes.last_prompts[tuple(row)]
        for (key, value), layer in zip(kept, alone.layers):
            assert torch.allclose(key, layer.keys, atol=1e-4) and torch.allclose(value, layer.values, atol=1e-4)
    texts = [first + " And one more turn." for first in firsts]
    rows = engine.encoder.encode(texts)
    inputs = engine._batch_inputs(rows, max_new_tokens=10)
    assert inputs[engine._cache_argument].get_seq_length() >= len(engine.encoder.encode(firsts)[1]) - 1
    engine.complete(firsts, params, ["a", "b"])  # kept again: building those inputs used them up
    together = [g.text for g in engine.complete(texts, params, ["c", "d"])]
    assert together == _alone(tiny_model, texts, params, ["c", "d"])


def test_unknown_engine_options_are_refused_by_name(tiny_model):
    with pytest.raises(UsageError, match=r"engine 'hf' takes no option 'batchsize'; its options: batch_size"):
        load_engine("hf", str(tiny_model), batchsize=4)
    with pytest.raises(UsageError, match="takes no option 'batch'"):
        load_engine("openai", "m", base_url="http://127.0.0.1:1/v1", batch=4)
    with pytest.raises(UsageError, match="known engines: hf, openai"):
        load_engine("vllm", str(tiny_model))


def test_a_choice_that_merges_into_the_text_is_scored_from_the_merged_token(engine):
    # "harm" + "ful" is one token, "Ġharmful": the choice's log-prob starts at that token (what the model would
    # produce after "The response is"), not at a token "ful" that the tokenizer never gives after "harm".
    text, choices = "The response is harm", ["ful", "less", " indeed"]
    tokenizer = engine.tokenizer
    base = tokenizer(text).input_ids
    direct = []
    for choice in choices:
        full = tokenizer(text + choice).input_ids
        start = next((k for k, (a, b) in enumerate(zip(base, full)) if a != b), len(base))
        with torch.no_grad():
            logprobs = torch.log_softmax(engine.lm(torch.tensor([full])).logits[0].float(), -1)
        direct.append(sum(float(logprobs[i - 1, full[i]]) for i in range(start, len(full))))
    assert tokenizer(text + "ful").input_ids[:len(base)] != base  # the boundary really merges
    assert engine.choice_logprobs([text], choices).logprobs[0] == pytest.approx(direct, abs=1e-4)


def test_choice_logprobs_return_the_tokens_cut_from_each_text_to_fit(engine):
    # Choices that part at their last token are read from one sequence, the text and the common part (the model
    # needs one position for the last token); choices that part earlier are a sequence each, cut each to fit,
    # and the text's cut is the larger.
    long, short = "A long question about locks and keys. " * 20, "Short?"
    assert engine.tokenizer.bos_token_id is None  # every count below is of the text's own tokens
    engine.max_positions, kept = 64, engine.max_positions
    try:
        shared = engine.choice_logprobs([long, short], [" (A", " (B"])
        apart = engine.choice_logprobs([long], [" I will not help.", " Sure"])
    finally:
        engine.max_positions = kept
    sequence = len(engine.tokenizer(long + " (A").input_ids)
    assert shared.cuts == [sequence - 64, 0] and len(shared.logprobs) == 2
    longest = max(len(engine.tokenizer(long + choice).input_ids) for choice in (" I will not help.", " Sure"))
    assert apart.cuts == [longest - 64]


def test_label_questions_share_their_few_shot_block_and_conversation(tiny_model):
    """The judge's questions (few-shot block, then one conversation under several principles in both orders) are
    scored with shared prefixes: equal to each question scored alone, in a fraction of the tokens."""
    from caictl.data.constitution import load as load_constitution
    from caictl.feedback.judge import CHOICES, Judge, PairToJudge

    engine = load_engine("hf", str(tiny_model), batch_size=8)
    constitution = load_constitution("harmless")
    judge = Judge(engine, constitution, debias=True, few_shot=True)
    conversations = [[{"role": "user", "content": "How do I pick a lock? " * 6}],
                     [{"role": "user", "content": "Write a rude note to my neighbour. " * 6}]]
    comparisons = [PairToJudge(str(i), messages, "Sure, here it is.", "I would rather not.",
                              constitution.comparison[:4]) for i, messages in enumerate(conversations)]
    questions = [judge.question(c.messages, p.text, a, b) for c in comparisons for p in c.principles
                 for a, b in ((c.first, c.second), (c.second, c.first))]
    assert len(questions) == 16

    embedded = []
    hook = engine.lm.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: embedded.append(inputs[0].numel()))
    try:
        engine.forget_prefixes()
        shared = engine.choice_logprobs(questions, list(CHOICES)).logprobs
        shared_tokens, shared_calls = sum(embedded), len(embedded)
        alone, embedded[:] = [], []
        for question in questions:
            engine.forget_prefixes()
            alone += engine.choice_logprobs([question], list(CHOICES)).logprobs
        alone_tokens = sum(embedded)
    finally:
        hook.remove()
    assert shared == [pytest.approx(row, abs=1e-5) for row in alone]
    # The few-shot block once, each conversation once, then each question's principle and options.
    assert shared_tokens < alone_tokens / 4, (shared_tokens, alone_tokens)
    # A batch (8 questions: one conversation) is a call for its conversation and a pass for its questions; what
    # only a question's two orders share (its principle) is cheaper in that pass than in calls of its own.
    assert shared_calls == 4


def test_gumbel_noise_is_a_function_of_seed_step_and_token_alone():
    from caictl.engines.sampling import gumbel_noise

    seeds = torch.tensor([7, 2**62 + 11, 123456789])
    batch = gumbel_noise(seeds, 5, 300)
    for row, seed in enumerate(seeds):
        assert torch.equal(gumbel_noise(seed.reshape(1), 5, 300)[0], batch[row])  # no matter the batch
    assert torch.equal(gumbel_noise(seeds, 5, 300), batch)  # deterministic
    assert not torch.equal(gumbel_noise(seeds, 6, 300), batch)  # a new draw each step
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch[1], batch[2])  # and each seed
    # Seeds that differ only in their high 32 bits draw differently too.
    assert not torch.equal(gumbel_noise(torch.tensor([5, 5 + 2**40]), 0, 300)[0],
                           gumbel_noise(torch.tensor([5 + 2**40]), 0, 300)[0])


def test_gumbel_max_samples_follow_the_softmax():
    """argmax(logits + noise) over 20,000 (seed, step) draws: the counts fit softmax(logits) by a chi-square
    test, and a token's share does not depend on its position in the vocabulary."""
    from caictl.engines.sampling import gumbel_noise

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0])
    expected = torch.softmax(logits, 0).double() * 20_000
    counts = torch.zeros(10, dtype=torch.float64)
    seeds = torch.arange(200) * 7919 + 3
    for step in range(100):
        picks = (logits + gumbel_noise(seeds, step, 10)).argmax(1)
        counts += torch.bincount(picks, minlength=10).double()
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    p_value = float(torch.special.gammaincc(torch.tensor(9 / 2, dtype=torch.float64),
                                            torch.tensor(chi_square / 2, dtype=torch.float64)))
    assert p_value > 1e-3, (chi_square, counts.tolist(), expected.tolist())


def test_decoding_is_compiled_by_default_only_with_cuda(tiny_model):
    engine = load_engine("hf", str(tiny_model), device="cpu")
    assert engine.compile is False and engine._compile_config() is None
    forced = load_engine("hf", str(tiny_model), device="cpu", compile=True)
    # transformers compiles generate()'s decoding step on CUDA by itself; on a CPU only when told to.
    assert forced.compile and forced._compile_config()._compile_all_devices
