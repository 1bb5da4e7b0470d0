"""Distil a masked diffusion LM into a few-step student with Masked Consistency Distillation (or SDTT).

Runs with `python` or `accelerate launch` (one or several processes, CPU or GPU); same flags as `mcd-hf distill`:

    accelerate launch examples/distill.py --teacher path/to/teacher_pipeline --source markov --seq_len 64 \
        --method mcd --divergence kl-bwd --num_rounds 2 --steps_per_round 400 --teacher_steps 64 \
        --train_batch_size 32 --output_dir mcd-student

The output folder is a complete `MCDPipeline` whose scheduler recommends `teacher_steps / 2^num_rounds` steps.
See `python examples/distill.py --help` for all flags and DESIGN.md section 4 for the method.
"""

import sys

from mcd_hf.training.distillation import main


if __name__ == "__main__":
    sys.exit(main())
