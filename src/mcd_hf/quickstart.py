"""The embedded default: teacher -> MCD student -> comparison, offline on a CPU (`mcd-hf demo`).

1. The corpus is the project's own known-likelihood source (a sparse random Markov chain over K = 32 tokens, see
   `mcd_hf.evaluation.sources`), so quality is an exact number: `NLL - H`, the mean negative log-likelihood per token
   of the samples under the true chain minus the entropy a perfect sampler would reach.
2. A small MDLM teacher is trained on it (`mcd_hf.training.teacher`), then distilled with MCD
   (`mcd_hf.training.distillation`), `num_rounds` rounds, so the student samples in `T / 2^num_rounds` steps.
3. Teacher at T steps, teacher at T/16 and student at T/16 are sampled on the same shadows
   (`mcd_hf.evaluation.quality.evaluate_sampling`), and a table and a plot are written.

Reruns reuse the trained teacher and student in `--output_dir` unless `--overwrite` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Sequence

DEFAULT_OUTPUT_DIR = os.path.join("outputs", "quickstart")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcd-hf demo", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help="teacher/, student/, results and plot")
    parser.add_argument("--overwrite", action="store_true", help="retrain even if trained models are present")
    parser.add_argument("--source", default="markov", choices=["markov", "hmm"], help="the embedded corpus")
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--teacher_train_steps", type=int, default=1000)
    parser.add_argument("--teacher_steps", type=int, default=64, help="T: the teacher's sampling steps")
    parser.add_argument("--num_rounds", type=int, default=4, help="the student samples in T / 2^num_rounds steps")
    parser.add_argument("--steps_per_round", type=int, default=100)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--num_samples", type=int, default=256, help="samples per evaluated system")
    parser.add_argument("--seed", type=int, default=0)
    # One thread by default: at this model size a second thread gains little, and when the 2 cores are shared with
    # anything else OpenMP threads oversubscribe them (measured here: 3.5 s per teacher step with 2 threads beside
    # other jobs, 0.2 s with 1).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--disable_progress_bar", action="store_true")
    return parser


def _train_teacher(args: argparse.Namespace, folder: str) -> None:
    from .training.teacher import train_teacher

    train_teacher([
        "--source", args.source, "--seq_len", str(args.seq_len), "--output_dir", folder,
        "--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
        "--num_attention_heads", "4", "--dropout", "0.0", "--no-time_conditioning",
        "--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(args.teacher_train_steps),
        # lr 1e-3 with a short warmup: the prototype's small DiT trains stably at this size and it is 3x faster
        # to converge than MDLM's 3e-4 for a 10-minute budget.
        "--learning_rate", "1e-3", "--lr_warmup_steps", "50", "--seed", str(args.seed),
        "--validation_steps", str(args.teacher_train_steps), "--cpu",
        *(["--disable_progress_bar"] if args.disable_progress_bar else []),
    ])


def _distill(args: argparse.Namespace, teacher: str, folder: str) -> None:
    from .training.distillation import distill

    distill([
        "--teacher", teacher, "--source", args.source, "--seq_len", str(args.seq_len), "--output_dir", folder,
        "--method", "mcd", "--divergence", "kl-bwd", "--num_rounds", str(args.num_rounds),
        "--steps_per_round", str(args.steps_per_round), "--teacher_steps", str(args.teacher_steps),
        "--train_batch_size", str(args.train_batch_size), "--learning_rate", "1e-4", "--seed", str(args.seed),
        "--cpu", *(["--disable_progress_bar"] if args.disable_progress_bar else []),
    ])


def _trained(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "model_index.json"))


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for row in rows:
        axis.errorbar(row["entropy"], row["excess_nll"], yerr=row["excess_nll_95"], xerr=row["entropy_95"],
                      fmt="o", capsize=3, label=f"{row['system']} @ {row['steps']} steps")
    axis.set_xlabel("unigram entropy of samples (nats, higher = more diverse)")
    axis.set_ylabel("NLL - H (nats/token, lower = better)")
    axis.set_title("Embedded default: quality vs diversity")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from . import MCDPipeline
    from .evaluation.quality import evaluate_sampling

    torch.set_flush_denormal(True)  # denormals slowed CPU training 2x in the prototype
    torch.set_num_threads(args.threads)
    teacher_dir = os.path.join(args.output_dir, "teacher")
    student_dir = os.path.join(args.output_dir, "student")
    if args.overwrite:
        for folder in (teacher_dir, student_dir):
            if _trained(folder):
                shutil.rmtree(folder)
    if not _trained(teacher_dir):
        print(f"== training the teacher ({args.teacher_train_steps} steps) -> {teacher_dir}")
        _train_teacher(args, teacher_dir)
    else:
        print(f"== reusing the teacher in {teacher_dir} (--overwrite retrains)")
    if not _trained(student_dir):
        print(f"== distilling with MCD ({args.num_rounds} rounds x {args.steps_per_round} steps) -> {student_dir}")
        _distill(args, teacher_dir, student_dir)
    else:
        print(f"== reusing the student in {student_dir}")

    student_steps = max(1, args.teacher_steps // 2 ** args.num_rounds)
    systems = [("teacher", teacher_dir, args.teacher_steps), ("teacher", teacher_dir, student_steps),
               ("MCD student", student_dir, student_steps)]
    rows = []
    for name, folder, steps in systems:
        pipe = MCDPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        print(f"== sampling {name} at {steps} steps ({args.num_samples} samples)")
        report = evaluate_sampling(pipe, num_inference_steps=steps, num_samples=args.num_samples,
                                   seq_len=args.seq_len, source=args.source, seed=args.seed + 10_000,
                                   sampler="shadow", label=name)
        rows.append({
            "system": name, "steps": steps,
            "excess_nll": report.excess_nll.mean, "excess_nll_95": report.excess_nll.half_width,
            "entropy": report.unigram_entropy.mean, "entropy_95": report.unigram_entropy.half_width,
            "impossible_pairs_percent": report.impossible_pair_percent,
            "model_calls_per_batch": report.model_calls_per_batch,
            "seconds_per_sample": report.seconds_per_sample,
        })
    reference = rows[0]["seconds_per_sample"]
    for row in rows:
        row["speed_up"] = reference / row["seconds_per_sample"]

    header = f"{'system':<12} {'steps':>5} {'NLL - H':>16} {'entropy':>15} {'bad pairs %':>11} " \
             f"{'model calls':>11} {'s/sample':>9} {'speed-up':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['system']:<12} {row['steps']:>5} {row['excess_nll']:>8.3f} ± {row['excess_nll_95']:<5.3f} "
            f"{row['entropy']:>7.3f} ± {row['entropy_95']:<5.3f} {row['impossible_pairs_percent']:>11.2f} "
            f"{row['model_calls_per_batch']:>11.1f} {row['seconds_per_sample']:>9.4f} {row['speed_up']:>7.1f}x"
        )
    table = "\n".join(lines)
    print()
    print(table)
    print("(± is a 95% interval; all systems sampled on the same shadows; NLL - H is exact under the source)")
    with open(os.path.join(args.output_dir, "quickstart.json"), "w") as handle:
        json.dump({"arguments": vars(args), "rows": rows}, handle, indent=2)
    plot_path = os.path.join(args.output_dir, "quickstart.png")
    _plot(rows, plot_path)
    print(f"wrote {plot_path} and quickstart.json")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("threads", "seq_len", "hidden_size", "num_hidden_layers", "teacher_train_steps", "teacher_steps",
                 "num_rounds", "steps_per_round", "train_batch_size", "num_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.teacher_steps % 2 ** args.num_rounds:
        raise ValueError(f"--teacher_steps ({args.teacher_steps}) must be divisible by 2^num_rounds "
                         f"({2 ** args.num_rounds})")
    os.makedirs(args.output_dir, exist_ok=True)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
