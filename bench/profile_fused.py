"""Which ATen ops the fused meta-step spends its time in (torch.profiler, CPU or CUDA).

    .venv/bin/python bench/profile_fused.py --config omniglot-5w1s [--impl fused] [--device cpu]
        [--rows 25] [--first-order]

One warm-up call, then one profiled call; prints the ops sorted by self time (CPU, or CUDA time
on a GPU) and with input shapes grouped, so grouped convolutions and the like show their sizes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import configs  # noqa: E402
import implementations  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="omniglot-5w1s", choices=sorted(configs.CONFIGS))
    parser.add_argument("--impl", default="fused_raw", choices=implementations.NAMES)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--shapes", action="store_true", help="also group by input shapes")
    args = parser.parse_args(argv)

    config = configs.get(args.config)
    model = configs.build_model(config, device=args.device)
    batch = configs.make_batch(config, device=args.device)
    impl = implementations.make(args.impl, model, config, batch, first_order=args.first_order)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    if not args.no_warmup:
        impl()
        sync()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities, record_shapes=args.shapes) as prof:
        impl()
        sync()
    wall = time.perf_counter() - start
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(
        f"# {args.impl} on {config.label}, {args.device}, threads={torch.get_num_threads()}, "
        f"profiled call {wall * 1e3:.0f} ms (profiler overhead included)"
    )
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=48))
    if args.shapes:
        print(
            prof.key_averages(group_by_input_shape=True).table(
                sort_by=key,
                row_limit=args.rows,
                max_name_column_width=40,
                max_shapes_column_width=90,
            )
        )


if __name__ == "__main__":
    main()
