"""Training speed on CPU (or --device cuda): the pieces of one ReFusion training step.

    python -m bench.bench_train                  # 2 threads, batch 2 pairs (4 after exchange), 128x128

Rows: F forward+backward; F forward + double backward (the release's second-order path); F's
forward-mode Jacobian-vector product (the second-order path of utils/meta.py); one whole stage-1
meta pair (inner + outer, with P and R); one whole stage-2 step (F and R Adam steps). Seconds
are medians over --repeat runs after one warm-up; peak RSS is for the process.
The release's figures (its code on 2 cores of an AMD EPYC, 2 threads, same input) are printed next
to ours. Because a host's speed drifts, the first two pieces are also compared with the plain
NCHW network of bench/release_style.py (same function, written the release's way) in --rounds
interleaved rounds: each round times ours, the plain network in this process (our allocator
settings) and the plain network in a child process with glibc's defaults (as the release runs),
one after the other; the ratios are taken per round and their median is reported.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
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
    parser.add_argument("--plain-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    from bench.release_style import PlainReFusion
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
    for name, fn in (("F forward+backward", lambda: forward_backward(fusion)),
                     ("F forward+double backward", lambda: forward_double_backward(fusion)),
                     ("F forward-mode JVP", forward_jvp),
                     ("meta pair (stage 1)", meta_pair), ("stage-2 step", stage_two)):
        median = median_seconds(fn)
        release = RELEASE_S.get(name)
        ratio = f"{release / median:.1f}x" if release and device.type == "cpu" and args.size == 128 \
            and args.pairs == 2 else "-"
        print(f"{name:>48} {median:8.2f} {release or '-':>10} {ratio:>9}")

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
