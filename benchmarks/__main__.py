"""`python -m benchmarks [--quick] [--json PATH] [--threads N] [--cases a,b]`: run, print a table, write JSON."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from afs_kit.core.device import resolve_device

from .cases import CASES, FULL, GPU_FULL, GPU_QUICK, QUICK, Context, default_data_path, run_cases


def format_table(results: list[dict]) -> str:
    rows = [("case", "kit s", "reference s", "ratio", "target", "met", "compared")]
    for r in results:
        if "kit_trustworthiness" in r:
            scores = f"trustworthiness {r['kit_trustworthiness']:.3f} vs {r['reference_trustworthiness']:.3f}"
        elif "flags_identical" in r:
            scores = (f"flags identical: {r['flags_identical']}; robust {r['kit_acc']:.1f}% vs "
                      f"{r['reference_acc']:.1f}%")
        elif "kit_acc" in r:
            scores = f"robust acc {r['kit_acc']:.1f}% vs {r['reference_acc']:.1f}% (fp32 torchattacks)"
        elif "kit_loss" in r:
            scores = f"train loss {r['kit_loss']:.3f} vs {r['reference_loss']:.3f}"
        else:
            scores = ""
        rows.append((r["name"], f"{r['kit_s']:.2f}", f"{r['reference_s']:.2f}", f"{r['ratio']:.2f}x",
                     f">= {r['target']:.2f}x", "yes" if r["meets_target"] else "NO", scores))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in results:
        if "kit_gflops" in r:
            lines.append(f"\nextractor training step ({r['kit_settings']['model']}, PGD-10, batch {r['kit_settings']['batch']}): "
                         f"kit {r['kit_step_gflop']:.0f} GFLOP in {r['kit_gflops']:.0f} GFLOP/s "
                         f"({100 * r['kit_fraction_of_bf16_peak']:.0f}% of the measured bf16 matmul peak "
                         f"{r['bf16_matmul_peak_gflops']:.0f} GFLOP/s); reference {r['reference_step_gflop']:.0f} "
                         f"GFLOP in {r['reference_gflops']:.0f} GFLOP/s (fp32 matmul peak "
                         f"{r['fp32_matmul_peak_gflops']:.0f} GFLOP/s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the small sizes (under 5 minutes on 2 cores)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (a list of dicts)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--cases", default="all", help=f"comma-separated subset of: {', '.join(CASES)}")
    parser.add_argument("--data", type=Path, default=default_data_path(), help="cifar10-mini.npz")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is not met")
    args = parser.parse_args(argv)
    names = list(CASES) if args.cases == "all" else [c.strip() for c in args.cases.split(",")]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")

    try:
        device = resolve_device(args.device)
    except ValueError as err:  # e.g. --device cuda where CUDA is missing: one line, status 2
        print(f"python -m benchmarks: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if device.type == "cuda":  # the paper's scale (see cases.GPU_QUICK)
        sizes = GPU_QUICK if args.quick else GPU_FULL
    else:
        sizes = QUICK if args.quick else FULL
    ctx = Context(sizes, args.quick, args.threads, device, args.data)
    print(f"afs-kit benchmarks ({'quick' if args.quick else 'full'}): torch {torch.__version__}, device {device}, "
          f"{args.threads} threads on {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    t = time.perf_counter()
    results = run_cases(ctx, names, log=lambda msg: print(msg, flush=True))
    total = time.perf_counter() - t
    for r in results:
        r["run"] = {"quick": args.quick, "total_s": round(total, 1), "setup_s": round(ctx.setup_s, 1),
                    "torch": torch.__version__, "load_average_end": round(os.getloadavg()[0], 2)}
    print()
    print(format_table(results))
    print(f"\ntotal {total:.0f} s (of which {ctx.setup_s:.0f} s training the small CNNs); "
          f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 1 if args.strict and not all(r["meets_target"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
