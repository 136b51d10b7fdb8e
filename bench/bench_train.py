"""Training speed on CPU (or --device cuda): the pieces of one ReFusion training step.

    python -m bench.bench_train                  # 2 threads, batch 2 pairs (4 after exchange), 128x128

Rows: F forward+backward; F forward + double backward (the release's second-order path); F's
forward-mode Jacobian-vector product (the second-order path of utils/meta.py); one whole stage-1
meta pair (inner + outer, with P and R); one whole stage-2 step (F and R Adam steps). Seconds
are medians over --repeat runs after one warm-up; peak RSS is for the process.
The release's figures (its code on 2 cores of an AMD EPYC, 2 threads, same input) are printed next
to ours. Because a host's speed drifts, the first two pieces are also compared with the plain
NCHW network of ReFusion_plain.py (same function, written the release's way) in --rounds
interleaved rounds: each round times ours, the plain network in this process (our allocator
settings) and the plain network in a child process with glibc's defaults (as the release runs),
one after the other; the ratios are taken per round and their median is reported. Each
network's forward FLOPs and the rate both training rounds reach follow the table.

    python -m bench.bench_train --ranks 2             # CPU: 2 processes x 1 thread vs 1 x 2 threads
    python -m bench.bench_train --ranks 1,2,4,8 --device cuda --pairs 8   # 1..8 GPUs

    python -m bench.bench_train --compiled --rounds 2  # stage-2 step: ours, plain lines, plain + torch.compile
    python -m bench.bench_train --kernel-rates         # GFLOP/s of the convolutions alone

``--ranks`` times train.py's own rounds (stage-1 meta pairs per second, stage-2 steps of the
global batch ``--pairs`` per second) in one process and under torchrun with each number of
processes, --rounds times interleaved, on synthetic data; P's accumulation group is the largest
count, so that stage 1 can use every process. On the CPU the --threads are shared out.
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

RELEASE_S = {"F forward+backward": 1.5, "F forward+double backward": 6.15, "meta pair (stage 1)": 10.0}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=2, help="batch size before input exchange")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds against the plain network (0: none)")
    parser.add_argument("--ranks", default="",
                        help="compare training over these numbers of processes (torchrun), e.g. 2 or 1,2,4")
    parser.add_argument("--steps", type=int, default=4,
                        help="--ranks: accumulation groups of stage 1 and steps of stage 2 timed")
    parser.add_argument("--compiled", action="store_true",
                        help="time the stage-2 step of ours, of the plain lines and of the plain lines "
                             "under torch.compile, each in its own process, --rounds times")
    parser.add_argument("--kernel-rates", action="store_true",
                        help="GFLOP/s of the networks' 1x1 and depthwise 3x3 convolutions alone")
    parser.add_argument("--step-worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--plain-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank-worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--group", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        return time_training_rounds(args)
    if args.ranks:
        return compare_ranks(args)
    if args.step_worker:
        return time_stage_two(args)
    if args.compiled:
        return compare_compiled(args)
    if args.kernel_rates:
        return kernel_rates(args)

    import torch

    from ReFusion_plain import PlainReFusion
    from ReFusion import LPN, ReFusion, ReN
    from utils.meta import LossWeights, exchange, fusion_step, lpn_meta_gradient
    from utils.losses import fusion_loss
    from utils.runtime import resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    fusion, recon, lpn = (net().to(device) for net in (ReFusion, ReN, LPN))
    batch = torch.rand(args.pairs, 2, args.size, args.size, device=device)
    outer = torch.rand(args.pairs, 2, args.size, args.size, device=device)
    inputs = exchange(batch)
    weights = LossWeights()
    with torch.no_grad():
        w_int, w_grad = lpn(inputs)
    opt_f = torch.optim.Adam(fusion.parameters(), 1e-4)
    opt_r = torch.optim.Adam(recon.parameters(), 1e-4)

    plain = PlainReFusion().to(device)
    plain.load_state_dict(fusion.state_dict())

    def forward_backward(net):
        fusion_loss(inputs, net(inputs), w_int, w_grad).backward()

    def forward_double_backward(net):
        loss = fusion_loss(inputs, net(inputs), w_int, w_grad)
        grads = torch.autograd.grad(loss, list(net.parameters()), create_graph=True)
        sum((g * g).sum() for g in grads).backward()

    point = {k: v.detach() for k, v in fusion.named_parameters()}
    direction = {k: torch.randn_like(v) for k, v in point.items()}

    def forward_jvp():
        torch.func.jvp(lambda p: torch.func.functional_call(fusion, p, (inputs,)), (point,), (direction,))

    def meta_pair():
        lpn_meta_gradient(fusion, recon, lpn, batch, outer, 1e-4, weights)

    def stage_two():
        fusion_step(fusion, recon, lpn, batch, weights, opt_f, opt_r)

    def median_seconds(fn):
        fn()
        times = []
        for _ in range(args.repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        fusion.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        return statistics.median(times)

    compared = (("F forward+backward", forward_backward),
                ("F forward+double backward", forward_double_backward))
    if args.plain_server:
        serve_plain_timings(lambda: {name: median_seconds(lambda: fn(plain)) for name, fn in compared})
        return

    print(f"device={device.type} threads={args.threads} input {tuple(inputs.shape)} "
          f"(batch {args.pairs} x2 exchange), repeat={args.repeat}")
    print(f"{'piece':>48} {'s/step':>8} {'release s':>10} {'speed-up':>9}")
    medians = {}
    for name, fn in (("F forward+backward", lambda: forward_backward(fusion)),
                     ("F forward+double backward", lambda: forward_double_backward(fusion)),
                     ("F forward-mode JVP", forward_jvp),
                     ("meta pair (stage 1)", meta_pair), ("stage-2 step", stage_two)):
        median = medians[name] = median_seconds(fn)
        release = RELEASE_S.get(name)
        ratio = f"{release / median:.1f}x" if release and device.type == "cpu" and args.size == 128 \
            and args.pairs == 2 else "-"
        print(f"{name:>48} {median:8.2f} {release or '-':>10} {ratio:>9}")

    print_flops(fusion, recon, lpn, inputs, medians)

    child = PlainChild(args) if args.rounds else None
    ratios = {}  # (piece, baseline) -> one ratio per round
    for round_index in range(1, args.rounds + 1):
        seconds = {}
        for name, fn in compared:
            seconds[name, "ours"] = median_seconds(lambda: fn(fusion))
            seconds[name, "plain"] = median_seconds(lambda: fn(plain))
        for name, value in child.timings().items():
            seconds[name, "plain, glibc defaults"] = value
        for name, _ in compared:
            cells = []
            for baseline in ("plain", "plain, glibc defaults"):
                if (name, baseline) in seconds:
                    ratio = seconds[name, baseline] / seconds[name, "ours"]
                    ratios.setdefault((name, baseline), []).append(ratio)
                    cells.append(f"{baseline} {seconds[name, baseline]:.2f} s ({ratio:.1f}x)")
            print(f"round {round_index}: {name}: ours {seconds[name, 'ours']:.2f} s; "
                  + "; ".join(cells))
    if child:
        child.close()
    for (name, baseline), values in ratios.items():
        print(f"same run, median of {len(values)} rounds: {name}: ours is "
              f"{statistics.median(values):.1f}x faster than {baseline} "
              f"(rounds {min(values):.1f}-{max(values):.1f}x)")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"peak RSS {peak_gb:.2f} GB (this process)")


def print_flops(fusion, recon, lpn, inputs, medians):
    """Each network's forward FLOPs on ``inputs`` and the rate the two training rounds reach
    (``medians``: seconds by piece). A stage-2 step is F and R forward + backward and P forward;
    a meta pair F forward + backward twice (inner batch, outer batch) and a JVP of F (a forward
    and its tangent), P forward + backward, R forward + backward twice. PyTorch's counter is
    told that oneDNN's direct convolutions count as convolutions; backward passes are not counted (it takes a grouped
    convolution's as an ungrouped one) but taken as twice their forward: one product for the
    input's gradient, one for the weights'."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

    def onednn_convolution(x_shape, w_shape, *_, out_shape=None, **__):
        return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)

    onednn = {torch.ops.aten.mkldnn_convolution: onednn_convolution,
              torch.ops.mkldnn._convolution_pointwise: onednn_convolution}

    def forward_gflop(net, x):
        with FlopCounterMode(display=False, custom_mapping=onednn) as counter, torch.no_grad():
            net(x)
        return counter.get_total_flops() / 1e9

    flops = {"F": forward_gflop(fusion, inputs), "P": forward_gflop(lpn, inputs),
             "R": forward_gflop(recon, inputs[:, :1])}
    pixels = inputs.shape[0] * inputs.shape[2] * inputs.shape[3]
    print("forward GFLOP on this input: " + ", ".join(
        f"{name} {value:.2f} ({value * 1e9 / pixels / 1e3:.1f} kFLOP/pixel)" for name, value in flops.items()))
    work = {"stage-2 step": 3 * flops["F"] + flops["P"] + 3 * flops["R"],
            "meta pair (stage 1)": 9 * flops["F"] + 3 * flops["P"] + 6 * flops["R"]}
    for piece, gflop in work.items():
        print(f"{piece}: {gflop:.1f} GFLOP in {medians[piece]:.2f} s = {gflop / medians[piece]:.0f} GFLOP/s")


def kernel_rates(args):
    """The rate of the convolutions that hold most of the networks' FLOPs, each alone on a warm
    channels-last input of the stage-2 batch (``2 * --pairs`` images): what a training step
    could reach if nothing else took time."""
    import torch

    from utils.kernels.linear import depthwise_conv3x3, pointwise_conv

    torch.set_num_threads(args.threads)
    images, size = 2 * args.pairs, args.size

    def rate(fn, flop):
        for _ in range(3):
            fn()
        start = time.perf_counter()
        for _ in range(args.repeat):
            fn()
        return flop * args.repeat / (time.perf_counter() - start) / 1e9

    pixels = images * size * size
    for cin, cout in ((16, 48), (16, 64), (32, 16), (32, 96), (32, 128), (64, 32)):
        x = torch.rand(images, cin, size, size).contiguous(memory_format=torch.channels_last)
        w = torch.rand(cout, cin, 1, 1)
        print(f"1x1 {cin:>3} -> {cout:<3}: {rate(lambda: pointwise_conv(x, w), 2 * pixels * cin * cout):5.0f} GFLOP/s")
    for channels in (48, 64, 96):
        x = torch.rand(images, channels, size, size).contiguous(memory_format=torch.channels_last)
        w = torch.rand(channels, 1, 3, 3)
        print(f"depthwise 3x3, {channels:>3}: {rate(lambda: depthwise_conv3x3(x, w), 18 * pixels * channels):5.0f} GFLOP/s")


COMPILED_PATHS = {"ours": {}, "plain": {"REFUSION_PLAIN_KERNELS": "1"},
                  "plain, torch.compile": {"REFUSION_PLAIN_KERNELS": "1"}}


def compare_compiled(args):
    """Stage-2 steps of the three paths of ``COMPILED_PATHS``, one child process each, in turn.
    Our kernels do not go through torch.compile: Dynamo cannot trace autograd Functions with a
    custom ``jvp`` (utils/kernels) nor oneDNN's direct entry points under fake tensors."""
    seconds = {}
    for round_index in range(1, max(1, args.rounds) + 1):
        for path, env in COMPILED_PATHS.items():
            cmd = [sys.executable, "-m", "bench.bench_train", "--step-worker", path, "--size", str(args.size),
                   "--pairs", str(args.pairs), "--threads", str(args.threads), "--repeat", str(args.repeat)]
            done = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, env={**os.environ, **env})
            if done.returncode:
                raise SystemExit(f"error: {path} failed:\n{done.stderr[-2000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            seconds.setdefault(path, []).append(result["median"])
            print(f"round {round_index}: {path}: first step {result['first']:.1f} s, "
                  f"then {result['median']:.3f} s a step")
    ours = statistics.median(seconds["ours"])
    for path, values in seconds.items():
        print(f"{path:>24}: {statistics.median(values):.3f} s a stage-2 step "
              f"({statistics.median(values) / ours:.2f}x ours)")


def time_stage_two(args):
    """Worker of ``compare_compiled``: one JSON line, the first step's seconds (with any
    compilation) and the median of --repeat steps after a second warm-up step."""
    import torch

    from ReFusion import LPN, ReFusion, ReN
    from utils.meta import LossWeights, fusion_step

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fusion, recon, lpn = ReFusion(), ReN(), LPN()
    optimizers = [torch.optim.Adam(net.parameters(), 1e-4) for net in (fusion, recon)]
    if args.step_worker.endswith("torch.compile"):
        fusion, recon, lpn = (torch.compile(net) for net in (fusion, recon, lpn))
    batch = torch.rand(args.pairs, 2, args.size, args.size)

    def step():
        start = time.perf_counter()
        fusion_step(fusion, recon, lpn, batch, LossWeights(), *optimizers)
        return time.perf_counter() - start

    first = step()
    step()
    print(json.dumps({"first": first, "median": statistics.median(step() for _ in range(args.repeat))}))


def compare_ranks(args):
    """Training throughput in one process and under torchrun, side by side (see the docstring)."""
    import tempfile

    import h5py
    import numpy as np

    counts = sorted({1, *(int(n) for n in args.ranks.split(","))})
    group = max(2, *counts)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        data = os.path.join(folder, "pairs.h5")
        pairs = max(64, args.pairs * (args.steps + 2), group * (args.steps + 1) + 2)
        rng = np.random.default_rng(0)
        with h5py.File(data, "w") as store:
            for name in ("img1", "img2"):
                store[name] = rng.integers(0, 256, (pairs, 1, args.size, args.size), dtype=np.uint8)
        for round_index in range(1, args.rounds + 1):
            for count in counts:
                if args.pairs % count:
                    raise SystemExit(f"error: --pairs {args.pairs} (the global batch) does not split "
                                     f"over {count} processes")
                threads = max(1, args.threads // count) if args.device == "cpu" else args.threads
                worker = ["-m", "bench.bench_train", "--rank-worker", data, "--size", str(args.size),
                          "--pairs", str(args.pairs), "--threads", str(threads), "--device", args.device,
                          "--steps", str(args.steps), "--group", str(group)]
                launcher = [] if count == 1 else ["-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", str(count)]
                done = subprocess.run([sys.executable, *launcher, *worker], cwd=ROOT, text=True,
                                      capture_output=True)
                if done.returncode:
                    raise SystemExit(f"error: {count} process(es) failed:\n{done.stderr[-2000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                rows.setdefault((count, threads), []).append(result)
                print(f"round {round_index}: {count} x {threads} threads: "
                      f"{result['meta']:.3f} meta pairs/s, {result['fusion']:.3f} stage-2 steps/s")
    print(f"device={args.device} size={args.size} global batch {args.pairs} pairs, "
          f"P's group {group} pairs; medians of {args.rounds} rounds")
    print(f"{'processes x threads':>20} {'meta pairs/s':>13} {'x':>6} {'stage-2 steps/s':>16} {'x':>6}")
    base = {}
    for (count, threads), results in sorted(rows.items()):
        medians = {k: statistics.median(r[k] for r in results) for k in ("meta", "fusion")}
        base = base or medians
        print(f"{f'{count} x {threads}':>20} {medians['meta']:13.3f} {medians['meta'] / base['meta']:6.2f} "
              f"{medians['fusion']:16.3f} {medians['fusion'] / base['fusion']:6.2f}")


def time_training_rounds(args):
    """Worker of ``compare_ranks`` (alone or under torchrun): times Trainer's own stage-1 rounds
    and stage-2 steps after one of each as warm-up; rank 0 prints one JSON line."""
    import torch

    import train
    from utils.data import epoch_batches, meta_pairs_per_epoch
    from utils.distributed import join
    from utils.runtime import resolve_device

    config = train.parse_config(["--data", args.rank_worker, "--batch_size", str(args.pairs),
                                 "--accumulation_steps", str(args.group), "--device", args.device,
                                 "--threads", str(args.threads)])
    world = join(resolve_device(args.device), 600)
    trainer = train.Trainer(config, world=world)
    batches = epoch_batches(len(trainer.pairs), args.pairs, 0, 0)
    weights, rate = train.loss_weights_at(config, 0), config["lr"]

    def seconds(fn, until):
        world.max_of([0])  # start together
        start = time.perf_counter()
        while trainer.step < until:
            fn()
        if world.device.type == "cuda":
            torch.cuda.synchronize()
        world.max_of([0])
        return time.perf_counter() - start

    meta_pairs = meta_pairs_per_epoch(config["meta_rule"], len(batches), len(batches))

    def meta():
        trainer.meta_round(batches, meta_pairs, rate, rate, weights)

    def fusion():
        trainer.fusion_round(batches, weights)

    trainer.step = 0
    seconds(meta, args.group)
    meta_rate = args.group * args.steps / seconds(meta, args.group * (args.steps + 1))
    trainer.step = 0
    seconds(fusion, 1)
    fusion_rate = args.steps / seconds(fusion, args.steps + 1)
    if world.main:
        print(json.dumps({"meta": meta_rate, "fusion": fusion_rate}))
    world.leave()


def serve_plain_timings(measure):
    """Child side of ``PlainChild``: one JSON line of timings per ``time`` line on stdin."""
    for line in sys.stdin:
        if line.strip() == "time":
            print(json.dumps(measure()), flush=True)


class PlainChild:
    """The plain network's pieces, timed on request in a child process that allocates memory
    with glibc's defaults, as the release runs. Kept alive between rounds so each round's
    timings are taken next to ours; it computes nothing while we are timed."""

    def __init__(self, args):
        from utils.runtime import default_allocator_env
        cmd = [sys.executable, "-m", "bench.bench_train", "--plain-server", "--size", str(args.size),
               "--pairs", str(args.pairs), "--threads", str(args.threads),
               "--repeat", str(args.repeat), "--device", args.device]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=default_allocator_env(), cwd=ROOT)

    def timings(self):
        """``{piece: seconds}``; empty (with a note) if the child has failed."""
        try:
            self.proc.stdin.write("time\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            return json.loads(line)
        except (BrokenPipeError, json.JSONDecodeError):
            print("plain network with glibc defaults: child process failed")
            return {}

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


if __name__ == "__main__":
    from utils.runtime import keep_freed_memory
    keep_freed_memory()
    main()
