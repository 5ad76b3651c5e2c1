"""Cost per training step of the mixing alone on the CPU: CutMix and the timm-style switch against mixup.

Times what train.py does to a normalised batch before the forward pass (partner permutation, mixed
inputs, soft targets), for one lambda per batch and per sample, on the digits' shape (8 x 8, one
channel) and CIFAR's (32 x 32, three). Each cell is the best of --repeats blocks of --steps steps
(microseconds per step), the rules' blocks alternating; the header prints the load average, since
on a machine shared with other processes even the best block moves with it.

    python bench/mixing_cost.py                    # batch 128, both shapes
    python bench/mixing_cost.py --threads 1 --steps 300 --repeats 15
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mixup import cutmix_batch, mixup_batch, sample_lambdas, sample_mixing  # noqa: E402

SHAPES = {"digits 1x8x8": (1, 8, 8), "cifar 3x32x32": (3, 32, 32)}
NUM_CLASSES = 10


def step_functions(per_sample: bool, batch: int, steps: int):
    """{rule: f(x, y, step, generator)} over one block's draws, made as train.py makes them."""
    rng = np.random.default_rng(0)
    lams = sample_lambdas(rng, 1.0, steps, batch, per_sample)
    cut_only = sample_mixing(rng, sample_lambdas(rng, 0.0, steps, batch, per_sample), 0.0, 1.0, 1.0, 0.5)
    switch = sample_mixing(rng, lams, 1.0, 1.0, 1.0, 0.5)
    tensors = {name: (torch.from_numpy(d.lam).float(), torch.from_numpy(d.centre).float(),
                      torch.from_numpy(d.cut)) for name, d in (("cutmix", cut_only), ("switch", switch))}
    mix_lams = torch.from_numpy(lams).float()

    def mixup(x, y, step, generator):
        return mixup_batch(x, y, mix_lams[step], generator, NUM_CLASSES)

    def cutmix_rule(name):
        lam, centre, cut = tensors[name]

        def run(x, y, step, generator):
            if per_sample:
                return cutmix_batch(x, y, lam[step], centre[step], cut[step] if name == "switch" else None,
                                    generator, NUM_CLASSES)
            if name == "switch" and not bool(cut[step]):  # the host copy decides, as in train.py
                return mixup_batch(x, y, mix_lams[step], generator, NUM_CLASSES)
            return cutmix_batch(x, y, lam[step:step + 1], centre[step:step + 1], None, generator, NUM_CLASSES)
        return run

    return {"mixup": mixup, "cutmix": cutmix_rule("cutmix"), "switch": cutmix_rule("switch")}


def time_block(function, x, y, steps: int, generator: torch.Generator) -> float:
    """Microseconds per step over one block of `steps` steps."""
    start = time.perf_counter()
    for step in range(steps):
        function(x, y, step, generator)
    return (time.perf_counter() - start) / steps * 1e6


def time_rules(rules: dict, x, y, steps: int, repeats: int) -> dict:
    """{rule: best block's microseconds per step}; the rules' blocks alternate, so that a burst of load
    from other processes falls on all of them alike, and the best block is the one least disturbed."""
    generator = torch.Generator().manual_seed(0)
    for function in rules.values():
        function(x, y, 0, generator)  # warm-up
    blocks = {name: [] for name in rules}
    for _ in range(repeats):
        for name, function in rules.items():
            blocks[name].append(time_block(function, x, y, steps, generator))
    return {name: min(times) for name, times in blocks.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128, metavar="B", help="samples per step (default 128)")
    parser.add_argument("--steps", type=int, default=100, metavar="N", help="steps per timed block (default 100)")
    parser.add_argument("--repeats", type=int, default=9, metavar="R", help="timed blocks per cell (default 9)")
    parser.add_argument("--threads", type=int, default=None, metavar="T", help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch_size}, "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}; microseconds per step (best block)")
    print(f"{'shape':<15}{'lambda':<12}{'mixup':>9}{'cutmix':>9}{'switch':>9}{'cutmix/mixup':>14}")
    for label, shape in SHAPES.items():
        x = torch.randn(args.batch_size, *shape, generator=torch.Generator().manual_seed(1))
        y = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=torch.Generator().manual_seed(2))
        for per_sample in (False, True):
            rules = step_functions(per_sample, args.batch_size, args.steps)
            times = time_rules(rules, x, y, args.steps, args.repeats)
            print(f"{label:<15}{'per sample' if per_sample else 'per batch':<12}{times['mixup']:>9.1f}"
                  f"{times['cutmix']:>9.1f}{times['switch']:>9.1f}{times['cutmix'] / times['mixup']:>14.2f}")


if __name__ == "__main__":
    main()
