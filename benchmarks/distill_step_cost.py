"""Cost of one distillation step relative to one teacher-training (MDLM NELBO) step, same batch and model.

One step = loss (forward passes), backward, AdamW update. MCD with data coupling adds one no-grad teacher forward
to the MDLM step, so the target is <= 1.6x; teacher coupling and SDTT add two no-grad forwards. Prints the median
of `--repeats` timed steps after `--warmup` untimed ones; asserts nothing (DESIGN.md section 4, issue 7).

    python benchmarks/distill_step_cost.py --hidden_size 128 --num_layers 4 --seq_len 128 --batch_size 8
"""

import argparse
import copy
import statistics
import time

import torch

from mcd_hf.configuration_mcd import MaskedDiffusionLMConfig
from mcd_hf.duality import get_noise_schedule
from mcd_hf.modeling_mcd import MaskedDiffusionLM
from mcd_hf.training.distill_losses import distillation_loss
from mcd_hf.training.losses import mdlm_loss


def time_interleaved(steps: dict, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each variant, timed in turns so that load drift hits all alike."""
    for index in range(warmup):
        for step in steps.values():
            step(index)
    durations = {name: [] for name in steps}
    for index in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step(warmup + index)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            durations[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in durations.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab_size", type=int, default=1025, help="including [MASK]")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dt", type=float, default=1 / 64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # denormals slow CPU kernels (shared/research/distillation-prototype.md)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = MaskedDiffusionLMConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads, cond_dim=128, max_position_embeddings=args.seq_len, dropout=0.0,
        time_conditioning=True,
    )
    device = torch.device(args.device)
    student = MaskedDiffusionLM(config).to(device).train()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    schedule = get_noise_schedule("loglinear")
    batch = torch.randint(0, config.vocab_size - 1, (args.batch_size, args.seq_len), device=device)

    def generator(index):
        return torch.Generator(device=device).manual_seed(index)

    def update(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def mdlm_step(index):
        update(mdlm_loss(student, batch, schedule, generator=generator(index))[0])

    def distill_step(method, coupling):
        def step(index):
            update(distillation_loss(method, student, teacher, batch, schedule, args.dt, coupling=coupling,
                                     generator=generator(index))[0])
        return step

    size = sum(p.numel() for p in student.parameters()) / 1e6
    print(f"device={device} threads={torch.get_num_threads()} params={size:.2f}M vocab={args.vocab_size} "
          f"seq_len={args.seq_len} batch={args.batch_size} dt={args.dt}")
    steps = {
        "MDLM teacher-training": mdlm_step,
        "MCD (data coupling)": distill_step("mcd", "data"),
        "MCD (teacher coupling)": distill_step("mcd", "teacher"),
        "SDTT": distill_step("sdtt", "data"),
    }
    seconds = time_interleaved(steps, args.warmup, args.repeats)
    baseline = seconds["MDLM teacher-training"]
    for name, value in seconds.items():
        print(f"{name:24s} step: {value * 1e3:8.1f} ms = {value / baseline:.2f}x the MDLM step")

if __name__ == "__main__":
    main()
