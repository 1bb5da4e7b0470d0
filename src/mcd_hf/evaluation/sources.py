"""Known-likelihood sources: synthetic languages whose exact log-probability is computable.

A sampler of length-L sequences that matches the source exactly has a mean NLL per token (under the
source) equal to the source's per-token entropy at that length, H(X_1..X_L) / L. The gap between the two,
`excess_nll`, measures what a sampler loses without any learned judge (DESIGN.md section 5). Sources use
tokens 0..K-1; `alphabet` gives one printable character per token so a character tokenizer maps id i to
`alphabet[i]` and back.

References:
    Cover & Thomas, "Elements of Information Theory", ch. 4 (entropy rate of a Markov chain).
    Rabiner (1989), "A tutorial on hidden Markov models" (forward algorithm, here in log space).
"""

import math
import string
from typing import Optional, Sequence, Union

import numpy as np
import torch

# Printable, non-space characters: a character tokenizer never splits or strips them.
ALPHABET_CHARACTERS = string.ascii_lowercase + string.digits + string.ascii_uppercase + string.punctuation

SequencesLike = Union[torch.Tensor, np.ndarray, Sequence[Sequence[int]]]


def _entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last dimension, with 0 log 0 = 0."""
    logs = torch.where(probabilities > 0, probabilities.log(), torch.zeros_like(probabilities))
    return -(probabilities * logs).sum(-1)


def _mean_and_standard_error(values: torch.Tensor) -> tuple[float, float]:
    return values.mean().item(), (values.std() / math.sqrt(values.numel())).item()


def _is_primitive(matrix: np.ndarray) -> bool:
    """Whether a stochastic matrix is irreducible and aperiodic (some power is all positive).

    Wielandt: a primitive n x n matrix has M^k > 0 for every k >= n^2 - 2n + 2; a non-primitive one has a zero
    in every power. Repeated squaring reaches a power of two past that bound.
    """
    support = (matrix > 0).astype(np.float64)
    bound = matrix.shape[0] ** 2 - 2 * matrix.shape[0] + 2
    for _ in range(max(1, math.ceil(math.log2(max(bound, 2))))):
        support = ((support @ support) > 0).astype(np.float64)
    return bool(support.all())


def _stationary_distribution(transition: np.ndarray) -> np.ndarray:
    """Stationary distribution of an irreducible chain: solve pi (P - I) = 0 with sum(pi) = 1."""
    size = transition.shape[0]
    system = transition.T - np.eye(size)
    system[-1] = 1.0  # replace one (redundant) balance equation by the normalisation
    rhs = np.zeros(size)
    rhs[-1] = 1.0
    try:
        stationary = np.clip(np.linalg.solve(system, rhs), 0.0, None)
    except np.linalg.LinAlgError:
        raise ValueError("transition must be irreducible (a unique stationary distribution)") from None
    return stationary / stationary.sum()


def _sparse_stochastic_matrix(
    rng: np.random.Generator, num_rows: int, num_columns: int, num_nonzero: int, concentration: float
) -> np.ndarray:
    """Each row: `num_nonzero` random columns with Dirichlet(concentration) weights, the rest zero."""
    matrix = np.zeros((num_rows, num_columns))
    for row in range(num_rows):
        columns = rng.choice(num_columns, size=num_nonzero, replace=False)
        matrix[row, columns] = rng.dirichlet([concentration] * num_nonzero)
    return matrix


def _random_primitive_matrix(
    rng: np.random.Generator, size: int, num_successors: int, concentration: float, max_tries: int = 1000
) -> np.ndarray:
    # Rejection sampling keeps the construction unbiased among primitive sparse chains; a unique stationary
    # distribution is needed for a well-defined entropy rate.
    for _ in range(max_tries):
        matrix = _sparse_stochastic_matrix(rng, size, size, num_successors, concentration)
        if _is_primitive(matrix):
            return matrix
    raise ValueError(
        f"num_successors={num_successors} never gave an irreducible aperiodic chain over {size} states in "
        f"{max_tries} tries; expected a larger num_successors"
    )


class KnownLikelihoodSource:
    """Base class: a finite-state source over tokens 0..K-1 with exact per-token conditional log-probs.

    Parameters are float64 tensors: `initial` (S,), `transition` (S, S) over hidden states and `emission`
    (S, K). A Markov chain is the case S = K with identity emissions. Subclasses implement
    `token_log_probs`, `sequence_entropy_per_token` and `entropy_rate`.
    """

    def __init__(self, initial: torch.Tensor, transition: torch.Tensor, emission: torch.Tensor):
        initial, transition, emission = (
            torch.as_tensor(p, dtype=torch.float64) for p in (initial, transition, emission)
        )
        num_states, vocab_size = emission.shape
        if initial.shape != (num_states,) or transition.shape != (num_states, num_states):
            raise ValueError(
                f"initial must have shape ({num_states},) and transition ({num_states}, {num_states}) to match "
                f"emission {tuple(emission.shape)}; got {tuple(initial.shape)} and {tuple(transition.shape)}"
            )
        for name, value in (("initial", initial), ("transition", transition), ("emission", emission)):
            if (value < 0).any() or not torch.allclose(value.sum(-1), torch.ones((), dtype=torch.float64), atol=1e-9):
                raise ValueError(f"{name} must be non-negative with rows summing to 1")
        if not 2 <= vocab_size <= len(ALPHABET_CHARACTERS):
            raise ValueError(f"vocab_size must be in [2, {len(ALPHABET_CHARACTERS)}], got {vocab_size}")
        self.initial, self.transition, self.emission = initial, transition, emission
        self.vocab_size = vocab_size
        self.alphabet = ALPHABET_CHARACTERS[:vocab_size]
        self.stationary = torch.from_numpy(_stationary_distribution(transition.numpy()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, num_states={self.emission.shape[0]})"

    # ----- validation and text -----------------------------------------------------------------
    def _check_sequences(self, sequences: SequencesLike) -> torch.Tensor:
        is_texts = isinstance(sequences, (list, tuple)) and len(sequences) > 0 and isinstance(sequences[0], str)
        if isinstance(sequences, str) or is_texts:
            sequences = self.encode(sequences)
        sequences = torch.as_tensor(sequences)
        if sequences.dim() != 2 or sequences.shape[1] == 0 or sequences.is_floating_point():
            raise ValueError(
                f"sequences must be integer ids of shape (num_sequences, seq_len), got {tuple(sequences.shape)}"
            )
        sequences = sequences.long().cpu()
        if sequences.numel() and (sequences.min() < 0 or sequences.max() >= self.vocab_size):
            raise ValueError(f"sequences must hold token ids in [0, {self.vocab_size}), got values outside")
        return sequences

    def decode(self, ids: SequencesLike) -> str:
        """One sequence of ids (1-D) -> its text, one alphabet character per token."""
        ids = torch.as_tensor(ids).reshape(-1).tolist()
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"ids must be in [0, {self.vocab_size})")
        return "".join(self.alphabet[i] for i in ids)

    def to_texts(self, sequences: SequencesLike) -> list[str]:
        """(N, L) ids -> N strings."""
        return [self.decode(row) for row in self._check_sequences(sequences)]

    def encode(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Strings of equal length -> (N, L) ids (a single string gives N = 1)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        index = {char: i for i, char in enumerate(self.alphabet)}
        if len({len(text) for text in texts}) > 1:
            raise ValueError("texts must all have the same length")
        try:
            return torch.tensor([[index[char] for char in text] for text in texts], dtype=torch.long)
        except KeyError as error:
            raise ValueError(f"texts must use only the alphabet {self.alphabet!r}; got {error}") from None

    # ----- sampling --------------------------------------------------------------------------------
    def sample(self, num_sequences: int, seq_len: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw `num_sequences` independent sequences of length `seq_len` -> LongTensor (N, L)."""
        if num_sequences < 1 or seq_len < 1:
            raise ValueError(f"num_sequences and seq_len must be >= 1, got {num_sequences} and {seq_len}")
        states = torch.multinomial(self.initial.expand(num_sequences, -1), 1, generator=generator).squeeze(1)
        tokens = [self._emit(states, generator)]
        for _ in range(seq_len - 1):
            states = torch.multinomial(self.transition[states], 1, generator=generator).squeeze(1)
            tokens.append(self._emit(states, generator))
        return torch.stack(tokens, dim=1)

    def _emit(self, states: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        return torch.multinomial(self.emission[states], 1, generator=generator).squeeze(1)

    def to_dataset(self, num_sequences: int, seq_len: int, seed: int = 0):
        """A `datasets.Dataset` with one column "input_ids" of `num_sequences` samples (seeded)."""
        import datasets  # imported here: `datasets` is slow to import and only needed for training data

        generator = torch.Generator().manual_seed(seed)
        return datasets.Dataset.from_dict({"input_ids": self.sample(num_sequences, seq_len, generator).tolist()})

    # ----- likelihood ----------------------------------------------------------------------------
    def token_log_probs(self, sequences: SequencesLike, floor: Optional[float] = None) -> torch.Tensor:
        """Per-position log p(x_t | x_<t), float64 (N, L). Subclasses implement this."""
        raise NotImplementedError

    def log_prob(self, sequences: SequencesLike, floor: Optional[float] = None) -> torch.Tensor:
        """Total log-probability of each sequence, float64 (N,).

        Args:
            sequences: ids (N, L), or strings over `alphabet`.
            floor: if given, probabilities below it (impossible transitions/emissions) count as `floor`
                (not renormalised), so a sampler's occasional impossible pair gives a finite penalty
                (the prototype used 1e-6). None: exact, -inf for impossible sequences.
        """
        return self.token_log_probs(sequences, floor=floor).sum(-1)

    def nll_per_token(self, sequences: SequencesLike, floor: Optional[float] = None) -> torch.Tensor:
        """-log p(x) / L for each sequence, float64 (N,)."""
        sequences = self._check_sequences(sequences)
        return -self.log_prob(sequences, floor=floor) / sequences.shape[1]

    def excess_nll(self, sequences: SequencesLike, floor: Optional[float] = 1e-6) -> float:
        """Mean NLL per token minus `sequence_entropy_per_token(L)`: 0 for a perfect sampler of length L.

        The reference is the per-token entropy of length-L sequences, not the entropy rate, because an
        exact sampler of fixed length L matches that (the first token alone carries H(X_1) > h).
        `floor` defaults to 1e-6 as in the prototype; with None any impossible sequence makes this inf.
        """
        sequences = self._check_sequences(sequences)
        mean_nll = self.nll_per_token(sequences, floor=floor).mean().item()
        return mean_nll - self.sequence_entropy_per_token(sequences.shape[1])

    # ----- entropies --------------------------------------------------------------------------
    def entropy_rate(self) -> float:
        """Entropy rate h = lim H(X_t | X_<t) in nats per token."""
        raise NotImplementedError

    def sequence_entropy_per_token(self, seq_len: int) -> float:
        """H(X_1..X_L) / L in nats: the mean NLL per token of an exact sampler of length L."""
        raise NotImplementedError

    def _state_marginals(self, seq_len: int) -> torch.Tensor:
        """Hidden-state marginals p(s_t) for t = 1..L, (L, S)."""
        marginals = [self.initial]
        for _ in range(seq_len - 1):
            marginals.append(marginals[-1] @ self.transition)
        return torch.stack(marginals)

    def pair_probabilities(self, seq_len: Optional[int] = None) -> torch.Tensor:
        """Distribution of an adjacent token pair (x_t, x_t+1), (K, K).

        With `seq_len`, pooled uniformly over the L - 1 positions of a length-L sequence (what
        `metrics.bigram_entropy` estimates from samples); with None, under the stationary distribution.
        """
        if seq_len is not None and seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 to have a pair, got {seq_len}")
        weights = self.stationary if seq_len is None else self._state_marginals(seq_len - 1).mean(0)
        # p(x, x') = sum_{s, s'} w(s) E(s, x) T(s, s') E(s', x')
        return self.emission.T @ (weights[:, None] * self.transition) @ self.emission

    def bigram_entropy(self, seq_len: Optional[int] = None) -> float:
        """Exact entropy (nats) of `pair_probabilities(seq_len)`: the true value of `metrics.bigram_entropy`."""
        return _entropy(self.pair_probabilities(seq_len).reshape(-1)).item()

    def impossible_pair_fraction(self, sequences: SequencesLike) -> float:
        """Fraction of adjacent pairs (x_t, x_t+1) in `sequences` that the source can never produce."""
        sequences = self._check_sequences(sequences)
        if sequences.shape[1] < 2:
            raise ValueError("sequences must have seq_len >= 2 to have pairs")
        possible = self.pair_probabilities() > 0
        return 1.0 - possible[sequences[:, :-1], sequences[:, 1:]].double().mean().item()


class MarkovChainSource(KnownLikelihoodSource):
    """A sparse random Markov chain over K tokens.

    Each token has `num_successors` allowed successors (a random subset) with Dirichlet(`concentration`)
    weights; the chain is redrawn until it is irreducible and aperiodic. The defaults (K = 32, 3
    successors, concentration 0.45, seed 0) were chosen to give an entropy rate of 0.704 nats/token, close
    to the prototype's chain (0.708); its stationary marginal has entropy 3.05 nats (log 32 = 3.47).

    Args:
        vocab_size: number of tokens K (at most 94, the printable alphabet).
        num_successors: allowed successors per token.
        concentration: Dirichlet concentration of the successor weights (smaller = peakier).
        seed: seed of the construction (numpy), so a source is reproducible from its arguments.
        initial: "stationary" (default: every position has the stationary marginal) or "uniform".
    """

    def __init__(
        self,
        vocab_size: int = 32,
        num_successors: int = 3,
        concentration: float = 0.45,
        seed: int = 0,
        initial: str = "stationary",
    ):
        if not 2 <= vocab_size <= len(ALPHABET_CHARACTERS):
            raise ValueError(f"vocab_size must be in [2, {len(ALPHABET_CHARACTERS)}], got {vocab_size}")
        if not 1 <= num_successors <= vocab_size:
            raise ValueError(f"num_successors must be in [1, vocab_size={vocab_size}], got {num_successors}")
        if concentration <= 0:
            raise ValueError(f"concentration must be > 0, got {concentration}")
        rng = np.random.default_rng(seed)
        transition = _random_primitive_matrix(rng, vocab_size, num_successors, concentration)
        self._init_chain(transition, initial)

    @classmethod
    def from_transition_matrix(
        cls, transition: torch.Tensor, initial: Union[str, torch.Tensor] = "stationary"
    ) -> "MarkovChainSource":
        """A chain with a given (K, K) transition matrix and initial distribution (a tensor or a name)."""
        source = cls.__new__(cls)
        source._init_chain(torch.as_tensor(transition, dtype=torch.float64).numpy(), initial)
        return source

    def _init_chain(self, transition: np.ndarray, initial: Union[str, torch.Tensor]) -> None:
        size = transition.shape[0]
        if isinstance(initial, str):
            if initial == "stationary":
                initial = _stationary_distribution(transition)
            elif initial == "uniform":
                initial = np.full(size, 1.0 / size)
            else:
                raise ValueError(f"initial must be 'stationary', 'uniform' or a tensor, got {initial!r}")
        super().__init__(torch.as_tensor(initial), torch.as_tensor(transition), torch.eye(size, dtype=torch.float64))

    def _emit(self, states: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        return states  # the state is the token

    def token_log_probs(self, sequences: SequencesLike, floor: Optional[float] = None) -> torch.Tensor:
        sequences = self._check_sequences(sequences)
        initial, transition = self.initial, self.transition
        if floor is not None:
            initial, transition = initial.clamp_min(floor), transition.clamp_min(floor)
        first = initial.log()[sequences[:, :1]]
        rest = transition.log()[sequences[:, :-1], sequences[:, 1:]]
        return torch.cat([first, rest], dim=1)

    def entropy_rate(self) -> float:
        """Exact: h = sum_i pi_i H(P_i) with pi the stationary distribution."""
        return (self.stationary @ _entropy(self.transition)).item()

    def sequence_entropy_per_token(self, seq_len: int) -> float:
        """Exact: (H(X_1) + sum_{t<L} sum_i p_t(i) H(P_i)) / L; with a stationary start, (H(pi) + (L-1) h) / L."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        marginals = self._state_marginals(seq_len)
        total = _entropy(self.initial) + (marginals[:-1] @ _entropy(self.transition)).sum()
        return total.item() / seq_len


class HiddenMarkovSource(KnownLikelihoodSource):
    """A sparse random hidden Markov model over K tokens.

    Hidden states follow a sparse random primitive chain (`num_successors` per state); each state emits
    `num_emissions` tokens with Dirichlet(`concentration`) weights. Token i is always among the emissions
    of state i mod S, so every token can occur. The start is the stationary state distribution.

    There is no closed form for the entropy of an HMM: `entropy_rate` and `sequence_entropy_per_token` are
    Monte Carlo estimates with exact forward-algorithm log-probs (see `estimate_entropy_rate` and
    `estimate_sequence_entropy`), seeded and cached, with standard errors of 2e-3 to 3e-3 nats for the
    defaults (h = 1.697 +- 0.003 nats/token).

    Args:
        vocab_size: number of tokens K.
        num_states: number of hidden states S.
        num_successors: allowed next states per state.
        num_emissions: tokens each state can emit.
        concentration: Dirichlet concentration of both transition and emission weights.
        seed: seed of the construction.
    """

    def __init__(
        self,
        vocab_size: int = 32,
        num_states: int = 16,
        num_successors: int = 3,
        num_emissions: int = 4,
        concentration: float = 0.5,
        seed: int = 0,
    ):
        if not 2 <= vocab_size <= len(ALPHABET_CHARACTERS):
            raise ValueError(f"vocab_size must be in [2, {len(ALPHABET_CHARACTERS)}], got {vocab_size}")
        if num_states < 1:
            raise ValueError(f"num_states must be >= 1, got {num_states}")
        if not 1 <= num_successors <= num_states:
            raise ValueError(f"num_successors must be in [1, num_states={num_states}], got {num_successors}")
        if not 1 <= num_emissions <= vocab_size:
            raise ValueError(f"num_emissions must be in [1, vocab_size={vocab_size}], got {num_emissions}")
        if concentration <= 0:
            raise ValueError(f"concentration must be > 0, got {concentration}")
        rng = np.random.default_rng(seed)
        transition = _random_primitive_matrix(rng, num_states, num_successors, concentration)
        emission = np.zeros((num_states, vocab_size))
        owners = np.arange(vocab_size) % num_states
        for state in range(num_states):
            owned = np.flatnonzero(owners == state)
            # own tokens first (so every token is emitted by some state), then random others to fill up
            others = rng.permutation(np.setdiff1d(np.arange(vocab_size), owned))
            tokens = np.concatenate([owned, others])[: max(num_emissions, len(owned))]
            emission[state, tokens] = rng.dirichlet([concentration] * len(tokens))
        initial = _stationary_distribution(transition)
        super().__init__(torch.from_numpy(initial), torch.from_numpy(transition), torch.from_numpy(emission))
        self._entropy_cache: dict = {}

    @classmethod
    def from_parameters(
        cls, initial: torch.Tensor, transition: torch.Tensor, emission: torch.Tensor
    ) -> "HiddenMarkovSource":
        """An HMM with given initial (S,), transition (S, S) and emission (S, K) probabilities."""
        source = cls.__new__(cls)
        KnownLikelihoodSource.__init__(source, initial, transition, emission)
        source._entropy_cache = {}
        return source

    def token_log_probs(self, sequences: SequencesLike, floor: Optional[float] = None) -> torch.Tensor:
        """Scaled forward algorithm (Rabiner 1989, section V.A): log p(x_t | x_<t) for every position.

        alpha_t(s) = p(s_t = s | x_1..x_t) is renormalised at each step in float64, so it never underflows,
        and the normaliser is exactly p(x_t | x_<t). After an impossible token alpha stays zero and every
        later conditional is -inf.
        """
        sequences = self._check_sequences(sequences)
        initial, transition, emission = self.initial, self.transition, self.emission
        if floor is not None:
            initial, transition, emission = (p.clamp_min(floor) for p in (initial, transition, emission))
        emission_per_token = emission.T  # (K, S)
        alpha = initial * emission_per_token[sequences[:, 0]]
        conditionals = []
        for t in range(sequences.shape[1]):
            if t > 0:
                alpha = (alpha @ transition) * emission_per_token[sequences[:, t]]
            normaliser = alpha.sum(-1)
            conditionals.append(normaliser.log())
            alpha = alpha / torch.where(normaliser > 0, normaliser, 1.0)[:, None]
        return torch.stack(conditionals, dim=1)

    def estimate_entropy_rate(
        self, num_samples: int = 256, seq_len: int = 1024, burn_in: Optional[int] = None, seed: int = 0
    ) -> tuple[float, float]:
        """Monte Carlo estimate of h and its standard error.

        Mean of -log p(x_t | x_<t) over positions t >= `burn_in` (default L/2) of `num_samples` sequences.
        H(X_t | X_<t) decreases to h geometrically fast for a mixing HMM, so past the burn-in the bias is
        far below the standard error (computed from the spread of per-sequence means).
        """
        burn_in = seq_len // 2 if burn_in is None else burn_in
        if not 0 <= burn_in < seq_len or num_samples < 2:
            raise ValueError(
                f"need 0 <= burn_in < seq_len and num_samples >= 2, got {burn_in}, {seq_len}, {num_samples}"
            )
        key = ("rate", num_samples, seq_len, burn_in, seed)
        if key not in self._entropy_cache:
            sequences = self.sample(num_samples, seq_len, torch.Generator().manual_seed(seed))
            per_sequence = -self.token_log_probs(sequences)[:, burn_in:].mean(-1)
            self._entropy_cache[key] = _mean_and_standard_error(per_sequence)
        return self._entropy_cache[key]

    def estimate_sequence_entropy(self, seq_len: int, num_samples: int = 4096, seed: int = 0) -> tuple[float, float]:
        """Monte Carlo estimate of H(X_1..X_L) / L = E[-log p(x)] / L and its standard error."""
        if seq_len < 1 or num_samples < 2:
            raise ValueError(f"need seq_len >= 1 and num_samples >= 2, got {seq_len} and {num_samples}")
        key = ("sequence", seq_len, num_samples, seed)
        if key not in self._entropy_cache:
            sequences = self.sample(num_samples, seq_len, torch.Generator().manual_seed(seed))
            per_sequence = -self.log_prob(sequences) / seq_len
            self._entropy_cache[key] = _mean_and_standard_error(per_sequence)
        return self._entropy_cache[key]

    def entropy_rate(self) -> float:
        """Monte Carlo estimate (`estimate_entropy_rate` with its defaults)."""
        return self.estimate_entropy_rate()[0]

    def sequence_entropy_per_token(self, seq_len: int) -> float:
        """Monte Carlo estimate (`estimate_sequence_entropy` with its defaults)."""
        return self.estimate_sequence_entropy(seq_len)[0]


_SOURCES = {"markov": MarkovChainSource, "hmm": HiddenMarkovSource}


def get_source(name: str, **kwargs) -> KnownLikelihoodSource:
    """Build a source by name: "markov" (`MarkovChainSource`) or "hmm" (`HiddenMarkovSource`).

    With no kwargs, "markov" is the embedded default chain (K = 32, seed 0, entropy rate 0.704 nats).
    """
    if name not in _SOURCES:
        raise ValueError(f"name must be one of {sorted(_SOURCES)}, got {name!r}")
    return _SOURCES[name](**kwargs)
