import itertools
import math

import pytest
import torch

from mcd_hf.evaluation.sources import HiddenMarkovSource, MarkovChainSource, get_source


def all_sequences(vocab_size, seq_len):
    return torch.tensor(list(itertools.product(range(vocab_size), repeat=seq_len)), dtype=torch.long)


def exact_entropy(log_probs):
    probs = log_probs.exp()
    return -(probs * torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))).sum().item()


def hand_chain():
    # 0 -> 1; 1 -> 0 or 2 (1/2 each); 2 -> 0. Stationary (0.4, 0.4, 0.2), so h = 0.4 log 2.
    transition = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    return MarkovChainSource.from_transition_matrix(transition)


@pytest.mark.parametrize("initial", ["stationary", "uniform"])
def test_markov_log_prob_matches_enumeration(initial):
    source = MarkovChainSource(vocab_size=3, num_successors=2, seed=1, initial=initial)
    sequences = all_sequences(3, 4)
    log_probs = source.log_prob(sequences)
    assert log_probs.dtype == torch.float64
    assert log_probs.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    for sequence, log_prob in zip(sequences.tolist(), log_probs.tolist()):
        direct = source.initial[sequence[0]].item()
        for a, b in zip(sequence[:-1], sequence[1:]):
            direct *= source.transition[a, b].item()
        assert math.exp(log_prob) == pytest.approx(direct, abs=1e-15)
    assert (log_probs == -math.inf).any(), "a 2-of-3 sparse chain must have impossible sequences"
    # exact per-token entropy at length L against enumeration
    assert source.sequence_entropy_per_token(4) == pytest.approx(exact_entropy(log_probs) / 4, abs=1e-12)


def test_hmm_log_prob_matches_sum_over_hidden_paths():
    source = HiddenMarkovSource(vocab_size=3, num_states=2, num_successors=2, num_emissions=2, seed=3)
    sequences = all_sequences(3, 4)
    log_probs = source.log_prob(sequences)
    assert log_probs.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    initial, transition, emission = source.initial, source.transition, source.emission
    for sequence, log_prob in zip(sequences.tolist(), log_probs.tolist()):
        direct = 0.0
        for path in itertools.product(range(2), repeat=4):
            term = initial[path[0]] * emission[path[0], sequence[0]]
            for t in range(1, 4):
                term = term * transition[path[t - 1], path[t]] * emission[path[t], sequence[t]]
            direct += term.item()
        assert math.exp(log_prob) == pytest.approx(direct, abs=1e-15)
    # conditionals telescope to the joint
    assert torch.allclose(source.token_log_probs(sequences).sum(-1), log_probs, equal_nan=True)


def test_hmm_with_identity_emissions_is_the_chain():
    chain = MarkovChainSource(vocab_size=5, num_successors=2, seed=0)
    hmm = HiddenMarkovSource.from_parameters(chain.initial, chain.transition, torch.eye(5, dtype=torch.float64))
    sequences = all_sequences(5, 3)
    expected = chain.log_prob(sequences)
    assert (expected == -math.inf).any()
    assert torch.equal(hmm.log_prob(sequences) == -math.inf, expected == -math.inf)
    finite = expected > -math.inf
    assert torch.allclose(hmm.log_prob(sequences)[finite], expected[finite], atol=1e-12)


@pytest.mark.parametrize("make_source", [
    lambda: MarkovChainSource(vocab_size=3, num_successors=2, seed=1),
    lambda: HiddenMarkovSource(vocab_size=3, num_states=2, num_successors=2, num_emissions=2, seed=3),
])
def test_sample_frequencies_match_probabilities(make_source):
    source = make_source()
    num_samples = 20000
    samples = source.sample(num_samples, 4, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (num_samples, 4) and samples.dtype == torch.long
    sequences = all_sequences(3, 4)
    probs = source.log_prob(sequences).exp()
    codes = (samples * torch.tensor([27, 9, 3, 1])).sum(-1)
    frequencies = torch.bincount(codes, minlength=81).double() / num_samples
    # each of the 81 cells is binomial: 5 sigma (+1/N for p = 0 cells, which must stay empty)
    bound = 5 * (probs * (1 - probs) / num_samples).sqrt() + 1.0 / num_samples
    assert ((frequencies - probs).abs() <= bound).all()
    assert (frequencies[probs == 0] == 0).all()


def test_hand_made_chain_entropies_and_impossible_pairs():
    source = hand_chain()
    assert torch.allclose(source.stationary, torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64))
    assert source.entropy_rate() == pytest.approx(0.4 * math.log(2), abs=1e-12)
    entropy_of_stationary = -sum(p * math.log(p) for p in (0.4, 0.4, 0.2))
    for seq_len in (1, 2, 10):
        expected = (entropy_of_stationary + (seq_len - 1) * 0.4 * math.log(2)) / seq_len
        assert source.sequence_entropy_per_token(seq_len) == pytest.approx(expected, abs=1e-12)
    # pairs: (0,1) p=.4, (1,0) p=.2, (1,2) p=.2, (2,0) p=.2
    assert source.bigram_entropy() == pytest.approx(-(0.4 * math.log(0.4) + 3 * 0.2 * math.log(0.2)), abs=1e-12)
    assert source.impossible_pair_fraction([[0, 1, 2, 0]]) == 0.0
    assert source.impossible_pair_fraction([[0, 0, 1, 1]]) == pytest.approx(2 / 3)
    assert source.log_prob([[0, 0, 1]]).item() == -math.inf
    floored = source.log_prob([[0, 0, 1]], floor=1e-6).item()
    assert floored == pytest.approx(math.log(0.4) + math.log(1e-6), abs=1e-12)


def test_markov_entropy_rate_matches_long_samples():
    source = get_source("markov")
    samples = source.sample(200, 500, generator=torch.Generator().manual_seed(0))
    # with a stationary start every transition's -log P has mean h; sequences are independent, so
    # the spread of per-sequence means gives the standard error; 5 of them bound the estimate
    per_sequence = -source.token_log_probs(samples)[:, 1:].mean(-1)
    standard_error = per_sequence.std().item() / math.sqrt(len(per_sequence))
    assert abs(per_sequence.mean().item() - source.entropy_rate()) < 5 * standard_error


def test_hmm_entropy_rate_between_exact_bounds():
    # Cover & Thomas 4.5: H(X_n | X_<n, S_1) <= h <= H(X_n | X_<n), both computed exactly by enumeration.
    source = HiddenMarkovSource(vocab_size=3, num_states=2, num_successors=2, num_emissions=2, seed=3)
    n = 8
    joint = lambda src, length: exact_entropy(src.log_prob(all_sequences(3, length)))
    upper = joint(source, n) - joint(source, n - 1)
    lower = 0.0
    for state in range(2):
        start = torch.zeros(2, dtype=torch.float64)
        start[state] = 1
        given_start = HiddenMarkovSource.from_parameters(start, source.transition, source.emission)
        lower += source.stationary[state].item() * (joint(given_start, n) - joint(given_start, n - 1))
    assert lower <= upper
    estimate, standard_error = source.estimate_entropy_rate()
    assert lower - 5 * standard_error <= estimate <= upper + 5 * standard_error
    assert source.entropy_rate() == estimate


def test_hmm_sequence_entropy_matches_enumeration():
    source = HiddenMarkovSource(vocab_size=3, num_states=2, num_successors=2, num_emissions=2, seed=3)
    exact = exact_entropy(source.log_prob(all_sequences(3, 5))) / 5
    estimate, standard_error = source.estimate_sequence_entropy(5)
    assert abs(estimate - exact) < 5 * standard_error
    assert source.sequence_entropy_per_token(5) == estimate


@pytest.mark.parametrize("name", ["markov", "hmm"])
def test_own_samples_have_zero_excess_nll(name):
    source = get_source(name)
    samples = source.sample(1000, 64, generator=torch.Generator().manual_seed(1))
    nll = source.nll_per_token(samples)
    assert torch.isfinite(nll).all()
    # excess = sample mean - reference; the reference is exact (chain) or an independent MC estimate (HMM)
    standard_error = nll.std().item() / math.sqrt(len(nll))
    if name == "hmm":
        standard_error = math.hypot(standard_error, source.estimate_sequence_entropy(64)[1])
    assert abs(source.excess_nll(samples)) < 5 * standard_error
    assert source.impossible_pair_fraction(samples) == 0.0


def test_default_markov_source():
    source = get_source("markov")
    assert source.vocab_size == 32
    assert source.entropy_rate() == pytest.approx(0.7043, abs=1e-4)  # pinned: the embedded default
    assert source.entropy_rate() == MarkovChainSource(vocab_size=32, seed=0).entropy_rate()
    # stationary start: H_L / L = (H(pi) + (L - 1) h) / L
    entropy_of_stationary = -(source.stationary * source.stationary.log()).sum().item()
    expected = (entropy_of_stationary + 63 * source.entropy_rate()) / 64
    assert source.sequence_entropy_per_token(64) == pytest.approx(expected, abs=1e-12)
    assert source.bigram_entropy(64) == pytest.approx(entropy_of_stationary + source.entropy_rate(), abs=1e-9)


def test_alphabet_text_and_dataset_round_trip():
    source = get_source("hmm", vocab_size=40, seed=2)
    assert len(source.alphabet) == 40 and len(set(source.alphabet)) == 40
    assert all(char.isprintable() and not char.isspace() for char in source.alphabet)
    samples = source.sample(5, 12, generator=torch.Generator().manual_seed(0))
    texts = source.to_texts(samples)
    assert all(len(text) == 12 for text in texts)
    assert torch.equal(source.encode(texts), samples)
    assert source.decode(samples[0]) == texts[0]
    assert torch.equal(source.log_prob(texts), source.log_prob(samples))
    dataset = source.to_dataset(6, 10, seed=4)
    assert dataset.column_names == ["input_ids"] and len(dataset) == 6
    assert dataset["input_ids"] == source.to_dataset(6, 10, seed=4)["input_ids"]
    assert torch.equal(torch.tensor(dataset["input_ids"]), source.sample(6, 10, torch.Generator().manual_seed(4)))


def test_bad_input_raises_value_error():
    source = get_source("markov")
    with pytest.raises(ValueError, match="name"):
        get_source("nope")
    with pytest.raises(ValueError, match="sequences"):
        source.log_prob(torch.tensor([[0, 32]]))
    with pytest.raises(ValueError, match="sequences"):
        source.log_prob(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="num_successors"):
        MarkovChainSource(vocab_size=4, num_successors=5)
    with pytest.raises(ValueError, match="vocab_size"):
        MarkovChainSource(vocab_size=200)
    with pytest.raises(ValueError, match="alphabet"):
        source.encode(["ab "])
    with pytest.raises(ValueError, match="irreducible"):
        MarkovChainSource.from_transition_matrix(torch.eye(3))
