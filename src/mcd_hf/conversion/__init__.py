"""Importers of published checkpoints into `MaskedDiffusionLM` (see `docs/conversion.md`)."""

from .mdlm import convert_mdlm_checkpoint, mdlm_config_to_config_values, mdlm_state_dict_to_mcd


__all__ = ["convert_mdlm_checkpoint", "mdlm_config_to_config_values", "mdlm_state_dict_to_mcd"]
