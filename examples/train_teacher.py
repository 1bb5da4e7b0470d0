"""Pretrain a masked diffusion LM (the MDLM NELBO) and save it as an `MCDPipeline`.

Runs with `python` or `accelerate launch` (one or several processes, CPU or GPU); same flags as `mcd-hf train-teacher`:

    # a local text file, a character tokenizer built from it, a 4-layer model
    python examples/train_teacher.py --train_file corpus.txt --seq_len 128 --max_train_steps 2000 \
        --output_dir teacher --checkpointing_steps 500 --resume_from_checkpoint latest

    # a Hub dataset with GPT-2's tokenizer ([MASK] appended), 2 GPUs, bf16, EMA as MDLM
    accelerate launch --config_file examples/accelerate_configs/multi_gpu_ddp.yaml examples/train_teacher.py \
        --dataset_name wikitext --dataset_config_name wikitext-103-raw-v1 --tokenizer_name gpt2 \
        --seq_len 1024 --hidden_size 768 --num_hidden_layers 12 --num_attention_heads 12 \
        --mixed_precision bf16 --ema_decay 0.9999 --output_dir teacher

    # a known-likelihood source (exact NLL available for evaluation), two CPU processes
    accelerate launch --config_file examples/accelerate_configs/cpu_ddp_2proc.yaml examples/train_teacher.py \
        --source markov --seq_len 64 --time_conditioning --output_dir markov-teacher

See `python examples/train_teacher.py --help` for every flag and DESIGN.md section 2 for the loss.
"""

import sys

from mcd_hf.training.teacher import main


if __name__ == "__main__":
    sys.exit(main())
