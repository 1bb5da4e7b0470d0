"""mcd_hf: masked diffusion language models and Masked Consistency Distillation (arXiv 2602.00792)."""

__version__ = "0.1.0"
