"""Figures of docs/theory.md: the keep probability A_K(rho) for several vocabulary sizes.

    python docs/make_figures.py            # writes docs/figures/keep_probability.png
"""

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mcd_hf.duality import keep_probability  # noqa: E402


def plot_keep_probability(path: str) -> None:
    rho = torch.linspace(0.0, 8.0, 400, dtype=torch.float64)
    figure, axis = plt.subplots(figsize=(6, 4))
    for vocab_size in (2, 32, 1000, 50257):
        axis.plot(rho, keep_probability(rho, vocab_size), label=f"K = {vocab_size}")
    axis.set_xlabel(r"signal-to-noise $\rho_t = a_t / s_t$")
    axis.set_ylabel(r"keep probability $A_K(\rho)$")
    axis.set_title("Masked marginal of the Gaussian shadow")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=os.path.join(os.path.dirname(__file__), "figures"))
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    plot_keep_probability(os.path.join(args.output_dir, "keep_probability.png"))
