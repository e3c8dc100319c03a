"""Seeded sampling for the hf engine, one row at a time whatever its batch.

Sampling uses the Gumbel-max trick: argmax(logits / T + Gumbel noise) is an exact sample from softmax(logits / T).
The noise is a hash of (the row's seed, from its request key; the step; the token), made on the model's device
(gumbel_noise). It makes a row's text independent of which other rows share its batch, which plain
`do_sample=True` (one global RNG) does not. The engine runs generate() greedily with a RowSampler as its logits
processor, so the greedy argmax is the sample.
"""

from __future__ import annotations

# The sampler's name, part of every sampling stage's resume settings: another sampler draws other text from a seed.
SAMPLER = "gumbel-hash32"
MASK32 = 0xFFFFFFFF  # the hash works on 32-bit words held in int64 tensors


class RowSampler:
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
