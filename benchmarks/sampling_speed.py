"""Sampling speed of `MCDPipeline`: pipeline overhead over the bare model calls, and forward passes saved.

For each step count and batch size, the pipeline samples with the shadow sampler and a fixed per-sequence seed; a
forward pre-hook records the inputs of every model call of one run (untimed). Then, alternately and `--repeats`
times, the script times (a) the whole pipeline call and (b) the bare model forward on exactly the recorded inputs.
Overhead = (pipeline time - model time) / model time: everything the pipeline and the scheduler add (SUBS in
float64, inverse-CDF draws, checks, steps that reveal nothing). Target: <= 10% (issue 8). Ratios come from the
same process and the same repeats, so they hold up better than absolute times on a shared machine.

Forward passes: `steps to finish` is the index of the last step that reveals a token, plus one (the steps a sampler
without skipping runs before no mask is left), `calls` the model calls actually made. The shadow sampler knows in
advance which steps reveal nothing and the pipeline skips them whole; a model without time conditioning is also not
called again while the tokens are unchanged, so a sequence needs at most min(steps, seq_len) calls.

    python benchmarks/sampling_speed.py --output_dir docs/figures
    python benchmarks/sampling_speed.py --pipeline path/to/pipeline --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from mcd_hf import MaskedDiffusionLM, MaskedDiffusionLMConfig, MaskedDualityScheduler, MCDPipeline


def build_pipeline(args) -> MCDPipeline:
    """The given pipeline, or a random model of the benchmark's size (timing does not depend on the weights)."""
    if args.pipeline is not None:
        pipe = MCDPipeline.from_pretrained(args.pipeline)
        pipe.scheduler = MaskedDualityScheduler.from_config(pipe.scheduler.config, sampler="shadow")
    else:
        torch.manual_seed(0)
        config = MaskedDiffusionLMConfig(
            vocab_size=args.vocab_size + 1, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
            num_attention_heads=args.num_heads, cond_dim=128, max_position_embeddings=args.seq_len,
            time_conditioning=args.time_conditioning, dropout=0.0,
        )
        scheduler = MaskedDualityScheduler(vocab_size=args.vocab_size + 1, sampler="shadow")
        pipe = MCDPipeline(model=MaskedDiffusionLM(config).eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=args.device, dtype=getattr(torch, args.dtype))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_pipeline(pipe, batch_size, seq_len, steps, seed, callback=None):
    generators = [torch.Generator().manual_seed(seed + index) for index in range(batch_size)]
    return pipe(batch_size=batch_size, seq_len=seq_len, num_inference_steps=steps, generator=generators,
                output_type="ids", callback_on_step_end=callback)


def record_model_inputs(pipe, batch_size, seq_len, steps, seed):
    """Inputs of every model call of one pipeline run, and the index of its last executed step plus one."""
    inputs, steps_to_finish = [], [0]

    def hook(module, args, kwargs):
        inputs.append({"input_ids": kwargs["input_ids"].clone(), "timesteps": kwargs.get("timesteps")})

    def count_steps(pipeline, step_index, timestep, callback_kwargs):
        steps_to_finish[0] = step_index + 1
        return None

    handle = pipe.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        output = run_pipeline(pipe, batch_size, seq_len, steps, seed, callback=count_steps)
    finally:
        handle.remove()
    assert len(inputs) == output.num_model_calls
    return inputs, steps_to_finish[0]


@torch.no_grad()
def time_model_calls(model, inputs, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for kwargs in inputs:
        model(**kwargs).logits
    synchronize(device)
    return time.perf_counter() - start


def time_pipeline(pipe, batch_size, seq_len, steps, seed, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run_pipeline(pipe, batch_size, seq_len, steps, seed)
    synchronize(device)
    return time.perf_counter() - start


def measure(pipe, steps, batch_size, args) -> dict:
    seq_len = args.seq_len
    inputs, steps_to_finish = record_model_inputs(pipe, batch_size, seq_len, steps, args.seed)
    # warm-up (allocator, kernels), then alternate the two timings so they share the machine's state
    time_pipeline(pipe, batch_size, seq_len, steps, args.seed, args.device)
    time_model_calls(pipe.model, inputs, args.device)
    pipeline_times, model_times = [], []
    for _ in range(args.repeats):
        pipeline_times.append(time_pipeline(pipe, batch_size, seq_len, steps, args.seed, args.device))
        model_times.append(time_model_calls(pipe.model, inputs, args.device))
    overheads = [p / m - 1.0 for p, m in zip(pipeline_times, model_times)]
    return {
        "steps": steps,
        "batch_size": batch_size,
        "steps_to_finish": steps_to_finish,
        "model_calls": len(inputs),
        "forward_passes_saved_percent": 100.0 * (1 - len(inputs) / steps_to_finish),
        "pipeline_seconds_per_sample": statistics.median(pipeline_times) / batch_size,
        "model_seconds_per_sample": statistics.median(model_times) / batch_size,
        "overhead_percent": 100.0 * statistics.median(overheads),
        "overhead_percent_min": 100.0 * min(overheads),
        "overhead_percent_max": 100.0 * max(overheads),
    }


def format_table(rows) -> str:
    header = ("| steps | batch | steps to finish | model calls | forwards saved | pipeline s/sample | model s/sample "
              "| overhead % (median, min..max) |")
    lines = [header, "|" + "---|" * 8]
    for row in rows:
        lines.append(
            f"| {row['steps']} | {row['batch_size']} | {row['steps_to_finish']} | {row['model_calls']} "
            f"| {row['forward_passes_saved_percent']:.0f}% | {row['pipeline_seconds_per_sample']:.2e} "
            f"| {row['model_seconds_per_sample']:.2e} | {row['overhead_percent']:.1f} "
            f"({row['overhead_percent_min']:.1f}..{row['overhead_percent_max']:.1f}) |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=None, help="an MCDPipeline folder (default: a random model)")
    parser.add_argument("--steps", default="1024,64,16,4", help="comma-separated step counts")
    parser.add_argument("--batch_sizes", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--vocab_size", type=int, default=32, help="real tokens of the random model")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--time_conditioning", action="store_true", help="random model with time conditioning")
    parser.add_argument("--all_settings", action="store_true",
                        help="also time batches larger than 1 at more steps than seq_len")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--output_dir", default=None, help="write benchmark_sampling_speed.json here")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_flush_denormal(True)  # denormals slow CPU kernels (shared/research/distillation-prototype.md)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pipe = build_pipeline(args)
    config = pipe.model.config
    args.seq_len = min(args.seq_len, config.max_position_embeddings)
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            if batch_size > 1 and steps > args.seq_len and not args.all_settings:
                # a batch reveals something at almost every step when steps > seq_len: ~steps calls of the whole
                # batch (skipping helps one sequence at a time); slow to time on a CPU, so left out by default
                continue
            rows.append(measure(pipe, steps, batch_size, args))
            print(f"# steps={steps} batch={batch_size}: overhead {rows[-1]['overhead_percent']:.1f}%", flush=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = {
        "device": args.device,
        "device_name": device_name,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "model": {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                  "vocab_size": config.vocab_size, "time_conditioning": config.time_conditioning,
                  "seq_len": args.seq_len, "pipeline": args.pipeline},
        "repeats": args.repeats,
        "rows": rows,
    }
    print(f"device {args.device} ({device_name}), {args.dtype}, {result['threads']} threads, model "
          f"{result['model']}")
    print(format_table(rows))
    if args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
        suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}_{args.dtype}"
        path = os.path.join(args.output_dir, f"benchmark_sampling_speed{suffix}.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
