"""Drawing a token from each row's distribution with the row's own random number, and a sequence's
random numbers by output position."""

import torch

from model_svc.engine.sampler import draw
from model_svc.engine.sequence import SamplingParams, Sequence


def uniform(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen))


def test_draws_follow_the_distribution_and_skip_impossible_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    num_draws = 20000
    for _ in range(num_draws):
        counts[draw(probs, [uniform(gen)])[0]] += 1
    assert counts[[0, 2, 5]].sum() == 0, "a token of probability 0 was drawn"
    # 20,000 draws: the standard deviation of a frequency is at most 0.0035; allow 4 of them.
    assert torch.allclose(counts / num_draws, probs[0], atol=0.014), counts / num_draws


def test_each_row_uses_its_own_number():
    probs = torch.softmax(torch.randn(3, 49152, generator=torch.Generator().manual_seed(1)), dim=-1)
    seeds = [7, 8, 9]

    def run(rows):
        gens = [torch.Generator().manual_seed(seeds[r]) for r in rows]
        return [draw(probs[rows], [uniform(g) for g in gens]) for _ in range(20)]

    together = run([0, 1, 2])
    alone = run([1])
    assert [step[1] for step in together] == [step[0] for step in alone]
    assert [step[0] for step in together] != [step[1] for step in together]  # different seeds differ


def test_unnormalized_rows_and_last_token():
    probs = torch.tensor([[0.0, 0.0, 2.0]])  # scaled, all mass on the last token
    assert {draw(probs, [uniform(torch.Generator().manual_seed(s))])[0] for s in range(50)} == {2}


def test_a_positions_number_does_not_depend_on_how_far_ahead_was_looked():
    """Output position i always gets the seeded generator's i-th number: peeking at later positions
    (speculation samples them before it knows which it keeps) changes nothing."""
    def sequence():
        seq = Sequence(0, [1], SamplingParams(do_sample=True, seed=5))
        seq.generator = torch.Generator().manual_seed(5)
        return seq

    plain, peeking = sequence(), sequence()
    expected = []
    for _ in range(12):
        expected.append(plain.uniform())
        plain.consume_uniforms(1)
    got = []
    for kept, looked in [(1, 4), (3, 3), (2, 6), (1, 1), (5, 5)]:
        ahead = [peeking.uniform(j) for j in range(looked)]
        got.extend(ahead[:kept])
        peeking.consume_uniforms(kept)
    assert got == expected
    assert expected == [uniform(g) for g in [torch.Generator().manual_seed(5)] for _ in range(12)]


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    from model_svc.engine.sampler import OccurrencePenalty

    scores = torch.zeros(1, 6)
    ids = torch.tensor([[4, 4, 1, 2, 2, 2, 5]])  # a prompt of 2 tokens (4, 4), then 1 2 2 2 5
    out = OccurrencePenalty(2, frequency=0.5, presence=0.25)(ids, scores.clone())
    # token 2: three times (-1.5 - 0.25), tokens 1 and 5 once (-0.5 - 0.25), 4 only in the prompt: 0
    assert out.tolist() == [[0.0, -0.75, -1.75, 0.0, 0.0, -0.75]]
    assert torch.equal(OccurrencePenalty(7, 0.5, 0.25)(ids, scores.clone()), scores)  # nothing generated yet
