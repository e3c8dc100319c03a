"""The seeded sampler (caictl.engines.sampling): bit for bit the noise its name stands for, made in few passes over
[rows, vocabulary], with a batch's seeds crossing to the device once."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from caictl.engines import sampling
from caictl.engines.sampling import RowSampler, gumbel_noise

# The sampler as first written, the reference for SAMPLER = "gumbel-hash32": a resumed run must draw the text that
# an uninterrupted one would have drawn.
MASK32 = 0xFFFFFFFF


def reference_gumbel_noise(seeds, step, vocabulary):
    low, high = seeds & MASK32, (seeds >> 32) & MASK32
    row_key = _lowbias32(_lowbias32(low ^ _lowbias32(high)) ^ _lowbias32(torch.full_like(low, step)))
    counters = torch.arange(vocabulary, dtype=torch.int64, device=seeds.device)
    bits = _lowbias32(_lowbias32(counters.unsqueeze(0) ^ row_key.unsqueeze(1)) ^ row_key.unsqueeze(1))
    uniform = ((bits >> 8).float() + 0.5) / 2**24
    return -torch.log(-torch.log(uniform))


def _lowbias32(x):
    x = x ^ (x >> 16)
    x = _times(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _times(x, 0x846CA68B)
    return x ^ (x >> 16)


def _times(x, constant):
    return (x * (constant & 0xFFFF) + (((x * (constant >> 16)) & 0xFFFF) << 16)) & MASK32


class ReferenceRowSampler:
    def __init__(self, temperature, top_p, seeds):
        self.temperature, self.top_p, self.seeds, self.step = temperature, top_p, seeds, 0

    def __call__(self, input_ids, scores):
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= self.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        seeds = torch.tensor(self.seeds, dtype=torch.int64, device=scores.device)
        noise = reference_gumbel_noise(seeds, self.step, scores.shape[-1])
        self.step += 1
        return scores + noise


# Seeds at the edges of request_seed's 63 bits and of the 32-bit halves, and a few drawn ones.
EDGE_SEEDS = [0, 1, 2**32 - 1, 2**32, 2**62 + 11, 2**63 - 2, 2**63 - 1]
DRAWN_SEEDS = torch.randint(0, 2**63 - 1, (9,), generator=torch.Generator().manual_seed(4)).tolist()


@pytest.mark.parametrize("vocabulary", [1, 7, 300, 5000])
def test_gumbel_noise_is_the_reference_bit_for_bit(vocabulary):
    seeds = torch.tensor(EDGE_SEEDS + DRAWN_SEEDS)
    for step in [0, 1, 63, 64, 65, 1000, 2**31 + 5]:
        assert torch.equal(gumbel_noise(seeds, step, vocabulary), reference_gumbel_noise(seeds, step, vocabulary))


def test_gumbel_noise_is_the_reference_bit_for_bit_over_a_qwen_vocabulary():
    seeds = torch.tensor([2**63 - 1, DRAWN_SEEDS[0]])
    for step in [0, 65]:
        assert torch.equal(gumbel_noise(seeds, step, 151_936), reference_gumbel_noise(seeds, step, 151_936))


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_sampler_is_the_reference_bit_for_bit(top_p, dtype):
    """Step after step, past the first KEY_STEPS (64) steps' keys, from logits of either precision."""
    seeds = [3, 2**63 - 1, DRAWN_SEEDS[1]]
    sampler, reference = RowSampler(0.7, top_p, seeds), ReferenceRowSampler(0.7, top_p, seeds)
    logits = torch.Generator().manual_seed(5)
    for step in range(70):
        scores = (torch.randn(3, 500, generator=logits) * 4).to(dtype)
        assert torch.equal(sampler(None, scores), reference(None, scores)), step


def test_row_sampler_leaves_the_logits_it_is_given_as_they_are():
    scores = torch.randn(2, 50)
    given = scores.clone()
    RowSampler(1.0, 0.5, [1, 2])(None, scores)
    assert torch.equal(scores, given)


def test_seeds_cross_to_the_device_once_per_batch(monkeypatch):
    """The reference makes a seeds tensor from a list at every step, a synchronising copy to a GPU."""
    created = []
    make_tensor = torch.tensor

    def counting_tensor(*args, **kwargs):
        created.append(kwargs.get("device"))
        return make_tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counting_tensor)
    sampler = RowSampler(0.7, 0.9, [5, 6, 7, 8])
    per_step = []
    for _ in range(66):  # past the first KEY_STEPS (64) steps' keys
        before = len(created)
        sampler(None, torch.randn(4, 300))
        per_step.append(len(created) - before)
    assert per_step == [1] + [0] * 65


class CountOps(TorchDispatchMode):
    """Counts the operations whose output has `numel` elements (the [rows, vocabulary] ones) and the others."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.wide, self.other = numel, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        wide = any(isinstance(tensor, torch.Tensor) and tensor.numel() == self.numel for tensor in outputs)
        (self.wide if wide else self.other).append(func.__name__)
        return out


@pytest.mark.parametrize("top_p, most_wide", [(1.0, 24), (0.9, 31)])
def test_a_step_makes_few_passes_over_the_vocabulary(top_p, most_wide):
    """The reference made 48 [rows, vocabulary] operations a step at top_p 1 and 56 below it (the hash in 16-bit
    halves over fresh tensors), and 83 smaller ones (the rows' keys, step by step); now the hash is about half
    as many in-place passes and the keys are made KEY_STEPS steps at a time."""
    rows, vocabulary = 4, 1000
    sampler = RowSampler(0.7, top_p, [1, 2, 3, 2**63 - 1])
    scores = torch.randn(rows, vocabulary)
    sampler(None, scores)  # the first step also moves the seeds and makes the batch's keys
    with CountOps(rows * vocabulary) as count:
        sampler(None, scores)
    assert len(count.wide) <= most_wide, count.wide
    assert len(count.other) <= 5, count.other


def test_compile_applies_on_cuda_alone():
    sampler = RowSampler(0.7, 1.0, [1, 2], compile=True)
    sampler(None, torch.randn(2, 30))
    assert sampler.noise.hash_bits is sampling._hash_bits


@pytest.mark.slow
def test_compiled_hash_gives_the_eager_bits():
    """torch.compile of the integer hash (what runs on CUDA), here through inductor's CPU backend: the same bits,
    for batches of several sizes from one compilation."""
    compiled = sampling._compiled_hash_bits()
    for seeds in ([5, 2**63 - 1, DRAWN_SEEDS[2]], DRAWN_SEEDS[3:8], [0, 1]):
        noise = sampling.BatchNoise(torch.tensor(seeds), 3000)
        noise.uniforms(0)
        for step in (0, 9):
            row_words = noise.row_words[step]
            assert torch.equal(compiled(noise.counter_words, row_words),
                               sampling._hash_bits(noise.counter_words, row_words))
