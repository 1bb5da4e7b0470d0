"""Step-keyed randomness, so that a resumed run draws exactly the numbers an uninterrupted run draws.

Every random draw of training (data order, diffusion times, shadows, dropout) comes from a seed derived by
hashing ``(seed, purpose, step, process, micro-batch)``, never from a global RNG stream whose position would have to
be saved and restored. Resuming at step ``k`` then needs nothing but ``k``. Same idea as JAX's ``fold_in``.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed that depends on all ``keys`` (ints or strings), stable across processes and Python runs."""
    text = "/".join(str(key) for key in keys).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def make_generator(seed: int, device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (CPU when None) seeded with ``seed``."""
    generator = torch.Generator(device=torch.device(device) if device is not None else "cpu")
    generator.manual_seed(seed)
    return generator


__all__ = ["derive_seed", "make_generator"]
