"""Seeded sampling for the hf engine, one row at a time whatever its batch.

Sampling uses the Gumbel-max trick: argmax(logits / T + Gumbel noise) is an exact sample from softmax(logits / T).
The noise is a hash of (the row's seed, from its request key; the step; the token), made on the model's device
(gumbel_noise). It makes a row's text independent of which other rows share its batch, which plain
`do_sample=True` (one global RNG) does not. The engine runs generate() greedily with a RowSampler as its logits
processor, so the greedy argmax is the sample.

A decoding step adds little to the model's own: a batch's seeds reach the device once (RowSampler), what depends on
a seed alone or on a token alone is made once per batch (BatchNoise), and what is left per step is about twenty
in-place passes over the [rows, vocabulary] words, or one compiled kernel and a few float passes on CUDA.
"""

from __future__ import annotations

import functools

# The sampler's name, part of every sampling stage's resume settings: another sampler draws other text from a seed.
SAMPLER = "gumbel-hash32"
MASK32 = 0xFFFFFFFF  # the hash works on 32-bit words held in int64 tensors
KEY_STEPS = 64  # rows' keys are made for this many steps at a time, so that most steps launch no small kernels


class RowSampler:
    """Temperature and top-p, then Gumbel noise that is a function of (row's seed, step, token id) alone
    (gumbel_noise), made where the logits are: a row's text depends on nothing else in its batch, and no
    vocabulary-sized noise crosses from the CPU to a GPU at each step.

    One RowSampler serves one batch: its seeds cross to the logits' device at the first step, and nothing does at
    the later ones. compile: on CUDA, the vocabulary-wide hash runs as one compiled kernel (the same bits)."""

    def __init__(self, temperature: float, top_p: float, seeds: list[int], compile: bool = False):
        self.temperature = temperature
        self.top_p = top_p
        self.seeds = seeds
        self.compile = compile
        self.step = 0
        self.noise: BatchNoise | None = None  # made at the first step, where the logits are

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float() / self.temperature  # a new tensor, which the steps below may change in place
        if self.top_p < 1.0:
            scores = _keep_top_p(scores, self.top_p)
        if self.noise is None:
            seeds = torch.tensor(self.seeds, dtype=torch.int64, device=scores.device)
            self.noise = BatchNoise(seeds, scores.shape[-1], compile=self.compile and scores.is_cuda)
        uniform = self.noise.uniforms(self.step)
        self.step += 1
        # scores + gumbel_noise's -log(-log(uniform)), its last negation made the subtraction: the same floats.
        return scores.sub_(uniform.log_().neg_().log_())


def _keep_top_p(scores, top_p: float):
    """scores, changed in place to -inf outside the top-p nucleus: a token goes when the tokens ranked above it
    already reach top_p; the first always stays."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    probabilities = sorted_scores.softmax(dim=-1)
    drop_sorted = probabilities.cumsum(dim=-1).sub_(probabilities) >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill_(drop, float("-inf"))


class BatchNoise:
    """The uniforms behind gumbel_noise, step after step, for one batch of seeds on their device. What depends on a
    seed alone (its key) or on a token alone (its counter's word) is made once, the rows' keys for KEY_STEPS steps at
    a time; a step then costs the vocabulary-wide hash (_hash_bits) and its floats. compile: that hash through
    torch.compile (_compiled_hash_bits)."""

    def __init__(self, seeds, vocabulary: int, compile: bool = False):
        import torch

        self.seed_keys = _seed_keys(seeds)
        self.counter_words = _xorshift16(torch.arange(vocabulary, dtype=torch.int64, device=seeds.device))
        self.hash_bits = _compiled_hash_bits() if compile else _hash_bits
        self.first_key_step = 0
        self.row_words = None  # [KEY_STEPS, rows], for steps from first_key_step on

    def uniforms(self, step: int):
        """Uniforms in (0, 1), [rows, vocabulary], for `step`: a new tensor."""
        if self.row_words is None or not 0 <= step - self.first_key_step < KEY_STEPS:
            self.first_key_step = step
            self.row_words = _row_words(self.seed_keys, step, KEY_STEPS)
        bits = self.hash_bits(self.counter_words, self.row_words[step - self.first_key_step])
        # 24 hashed bits k make (k + 0.5) / 2**24; k + 0.5 is computed in float32, as k.float() + 0.5 would be.
        return (bits + 0.5).div_(2**24)


def gumbel_noise(seeds, step: int, vocabulary: int):
    """Standard Gumbel noise [rows, vocabulary] from a counter-based generator: entry (row, token) is a hash of
    (seeds[row], step, token), so it is the same whatever else is computed, on any device, in any batch.
    argmax(logits + noise) is then an exact sample from softmax(logits) (the Gumbel-max trick).

    The hash is Wellons' lowbias32 on 32-bit words held in int64, with no product that overflows. A row's key for
    a step is lowbias32(lowbias32(low ^ lowbias32(high)) ^ lowbias32(step)), low and high its seed's 32-bit halves;
    entry (row, token) hashes lowbias32(lowbias32(token ^ key) ^ key). Its top 24 bits k make the uniform
    (k + 0.5) / 2**24 in (0, 1), so the noise -log(-log(uniform)) lies in about [-2.9, 17.3] rather than the
    Gumbel's unbounded range. These bits are what SAMPLER names; BatchNoise makes them in fewer passes."""
    import torch

    return -torch.log(-torch.log(BatchNoise(seeds, vocabulary).uniforms(step)))


def _seed_keys(seeds):
    """Each seed's part of its row's keys, lowbias32(low ^ lowbias32(high)), [rows]."""
    low, high = seeds & MASK32, (seeds >> 32) & MASK32
    return _lowbias32(low ^ _lowbias32(high))


def _row_words(seed_keys, first_step: int, steps: int):
    """xorshift16 of each row's key for `steps` steps from first_step on, [steps, rows] (see _hash_bits)."""
    import torch

    step_keys = _lowbias32(torch.arange(first_step, first_step + steps, dtype=torch.int64, device=seed_keys.device))
    return _xorshift16(_lowbias32(seed_keys.unsqueeze(0) ^ step_keys.unsqueeze(1)))


def _hash_bits(counter_words, row_words):
    """The top 24 bits of lowbias32(lowbias32(token ^ key) ^ key) for each row's key at one step and each token,
    [rows, vocabulary], from the tokens' xorshift16(token) and the rows' xorshift16(key).

    lowbias32 is xorshift16(mix(xorshift16(x))), and xorshift16 (x ^ x >> 16) distributes over ^ and undoes
    itself on 32-bit words, so the hash is xorshift16(mix(mix(xorshift16(token) ^ xorshift16(key)) ^
    xorshift16(key))): two ^, two mixes and one xorshift16 over [rows, vocabulary], all in one tensor."""
    words = counter_words ^ row_words.unsqueeze(1)
    _mix_(words)
    words ^= row_words.unsqueeze(1)
    _mix_(words)
    words ^= words >> 16
    return words >> 8


@functools.cache
def _compiled_hash_bits():
    """_hash_bits through torch.compile: on CUDA one fused kernel that writes the bits, in place of about twenty
    passes over [rows, vocabulary] int64 words. It is integer arithmetic alone, so it gives eager's bits on any
    backend; the floats made from them stay eager, since a compiled log need not round as the eager one does.
    dynamic: batches of every size share one compilation."""
    import torch

    return torch.compile(_hash_bits, dynamic=True)


def _lowbias32(x):
    """A 32-bit integer hash with good avalanche (Chris Wellons' lowbias32), on int64 tensors holding 32 bits."""
    return _xorshift16(_mix_(_xorshift16(x)))


def _xorshift16(x):
    """x ^ x >> 16, a new tensor: on 32-bit words it distributes over ^ and is its own inverse."""
    return x ^ (x >> 16)


def _mix_(x):
    """lowbias32 less its first and last xorshift16, in place on int64 tensors holding 32 bits: x * 0x7FEB352D,
    x ^ x >> 15, x * 0x846CA68B, each product mod 2**32. No product leaves int64, since a word is below 2**32 and
    each factor below 2**31 in magnitude: 0x846CA68B enters as 0x846CA68B - 2**32, which leaves the product's low
    32 bits as they are, and & MASK32 reads those off the two's-complement product."""
    x.mul_(0x7FEB352D).bitwise_and_(MASK32)
    x ^= x >> 15
    x.mul_(0x846CA68B - 2**32).bitwise_and_(MASK32)
    return x
