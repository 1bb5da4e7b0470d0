"""mcd_hf: masked diffusion language models and Masked Consistency Distillation (arXiv 2602.00792).

Importing the package registers `MaskedDiffusionLM` with transformers' Auto classes, so
`AutoModelForMaskedLM.from_pretrained(folder)` works without remote code.
"""

__version__ = "0.1.0"

from .configuration_mcd import MaskedDiffusionLMConfig
from .modeling_mcd import MaskedDiffusionLM, register_auto_classes
from .scheduling_mcd import MaskedDualityScheduler, MaskedDualitySchedulerOutput
from .pipeline_mcd import MCDPipeline, MCDPipelineOutput
from .hub import HubUnreachableError

register_auto_classes()

__all__ = [
    "HubUnreachableError",
    "MCDPipeline",
    "MCDPipelineOutput",
    "MaskedDiffusionLM",
    "MaskedDiffusionLMConfig",
    "MaskedDualityScheduler",
    "MaskedDualitySchedulerOutput",
    "__version__",
]
