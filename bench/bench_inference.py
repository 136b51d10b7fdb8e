"""Inference speed and memory of ReFusion, one fresh process per size.

    python -m bench.bench_inference                       # CPU, sizes 256..2048, 2 threads
    python -m bench.bench_inference --sizes 256x256,480x640 --baseline
    python -m bench.bench_inference --sizes 480x640 --device cuda --repeat 10
    python -m bench.bench_inference --sizes 2048x2048 --max_memory 2GB --whole --repeat 1
    python -m bench.bench_inference --sizes 4096x4096,8192x8192 --max_memory 2GB --repeat 1

Prints, per size and device: the first call (includes growing the heap), the median of
``--repeat`` warm calls in ms per pair and seconds per megapixel, peak memory (CPU: peak RSS of the process;
CUDA: peak allocated) and how much of it the forward passes added ("fwd GB": the peak minus the
peak before the first call, i.e. without libraries, weights and input), and the speed-up over the
release's CPU timings (its code on 2 cores of an AMD EPYC, 2 threads). ``--max_memory`` fuses as
``test.py`` does with that budget (exactly from tiles when the whole image does not fit; ``--whole``
adds the whole-image forward in the same run). A shared host's speed drifts by tens of percent, so
``--baseline`` also times, right
after ours and in the same run, the plain NCHW network of ``ReFusion_plain.py`` (same
function, written the way the release is) twice: in a process with glibc's default allocator, as
the release runs, and with the allocator settings our scripts use; the speed-up columns are then
ratios taken in this one run. Output equality with the release is what tests/test_parity.py
checks.
"""
import os
import sys

# runnable as python bench/<script>.py too: the repository root on the path, as python -m has it
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import json
import resource
import statistics
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The release's code on 2 cores of an AMD EPYC, 2 threads: seconds per pair and peak RSS in GB.
RELEASE_CPU = {(256, 256): (0.75, None), (480, 640): (8.75, None),
               (1024, 1024): (24.0, 3.5), (2048, 2048): (108.0, 12.4)}


NETWORKS = ("ours", "plain")


def build(network):
    if network == "ours":
        from ReFusion import ReFusion
        return ReFusion()
    from ReFusion_plain import PlainReFusion
    return PlainReFusion()


def measure(height, width, device_name, repeat, threads, network, max_memory=None):
    """Runs in the child process: time one size, return a dict. ``max_memory`` (bytes): fuse as
    ``test.py --max_memory`` does (whole-image when it fits, else exactly from tiles)."""
    import torch
    from utils.runtime import resolve_device
    from utils.tiled import fuse

    torch.set_num_threads(threads)
    device = resolve_device(device_name)
    model = build(network).to(device).eval()
    x = torch.rand(1, 2, height, width, generator=torch.Generator().manual_seed(0)).to(device)

    def run():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model(x) if max_memory is None else fuse(model, x, max_memory)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def peak_gb():
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux

    before = peak_gb()  # libraries (ours loads OpenCV too), weights and input
    first = run()
    times = [run() for _ in range(repeat)] or [first]  # --repeat 0: the first call alone
    return {"size": f"{height}x{width}", "device": device.type, "first_s": first,
            "median_s": statistics.median(times), "peak_gb": peak_gb(),
            "forward_gb": peak_gb() - before}


def run_child(size, args, network, default_allocator=False, max_memory=None):
    """One measurement in a fresh process; ``default_allocator`` drops our glibc settings."""
    from utils.runtime import default_allocator_env
    env = default_allocator_env() if default_allocator else None
    cmd = [sys.executable, "-m", "bench.bench_inference", "--child", size, "--network", network,
           "--device", args.device, "--threads", str(args.threads), "--repeat", str(args.repeat)]
    if max_memory:
        cmd += ["--max_memory", max_memory]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        print(f"{size:>10} {network} failed: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256x256,480x640,1024x1024,2048x2048")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="warm calls timed (0: the first alone)")
    parser.add_argument("--baseline", action="store_true",
                        help="also time ReFusion_plain.py's plain network in this run")
    parser.add_argument("--max_memory", help="fuse as test.py --max_memory SIZE does (tiles when the "
                        "whole image does not fit)")
    parser.add_argument("--whole", action="store_true",
                        help="with --max_memory: also time the whole-image forward in this run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--network", choices=NETWORKS, default="ours", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        height, width = map(int, args.child.split("x"))
        from utils.runtime import parse_size
        print(json.dumps(measure(height, width, args.device, args.repeat, args.threads,
                                 args.network, args.max_memory and parse_size(args.max_memory))))
        return

    print(f"device={args.device} threads={args.threads} repeat={args.repeat} max_memory={args.max_memory or '-'}")
    print(f"{'size':>10} {'network':>13} {'first s':>8} {'ms/pair':>9} {'s/MP':>6} {'peak GB':>8} "
          f"{'fwd GB':>7} {'release s':>9} {'speed-up':>8} {'release GB':>10}")
    for size in args.sizes.split(","):
        height, width = map(int, size.split("x"))
        release_s, release_gb = RELEASE_CPU.get((height, width), (None, None))
        runs = [("ours", run_child(size, args, "ours", max_memory=args.max_memory))]
        if args.max_memory and args.whole:
            runs.append(("ours whole", run_child(size, args, "ours")))
        if args.baseline:
            runs += [("plain", run_child(size, args, "plain", default_allocator=True)),
                     ("plain+heap", run_child(size, args, "plain"))]
        for label, row in runs:
            if row is None:
                continue
            speedup = (f"{release_s / row['median_s']:.1f}x"
                       if release_s and args.device == "cpu" else "-")
            print(f"{size:>10} {label:>13} {row['first_s']:8.2f} {row['median_s'] * 1e3:9.0f} "
                  f"{row['median_s'] / (height * width / 1e6):6.2f} {row['peak_gb']:8.2f} "
                  f"{row['forward_gb']:7.2f} "
                  f"{release_s or '-':>9} {speedup:>8} {release_gb or '-':>10}")
        ours = runs[0][1]
        if ours is not None and len(runs) > 1:
            ratios = ", ".join(f"{row['median_s'] / ours['median_s']:.1f}x vs {label}"
                               for label, row in runs[1:] if row is not None and label != "ours whole")
            whole = dict(runs).get("ours whole")
            if whole is not None:
                print(f"{size:>10} {'same run':>13}   with --max_memory {args.max_memory}: "
                      f"{ours['median_s'] / whole['median_s']:.2f}x the whole-image time")
            if ratios:
                print(f"{size:>10} {'same run':>13}   ours is {ratios}")


if __name__ == "__main__":
    from utils.runtime import keep_freed_memory
    keep_freed_memory()
    main()
