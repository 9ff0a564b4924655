"""Training and inference throughput (images/s) of the EfficientNet backbones.

Runs a few optimizer steps on random data for every combination of backbone, resolution,
implementation and speed variant (channels_last and/or autocast) and prints one row each,
then a Markdown table. Nothing is downloaded; weights are random.

Example (about a minute on a 2-core CPU), from the repository root:
    .venv/bin/python -m bench.train_throughput --backbones b0 --resolutions 64,128 \
        --variants fp32,channels_last --steps 3
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import models

VARIANTS = {
    "fp32": (False, False),
    "channels_last": (True, False),
    "autocast": (False, True),
    "channels_last+autocast": (True, True),
}


@dataclass(frozen=True)
class Result:
    implementation: str
    backbone: str
    resolution: int
    variant: str
    train: float
    infer: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(spec: models.ModelSpec, size: int, device: torch.device, channels_last: bool) -> dict:
    batch = {k: v.to(device) for k, v in models.example_inputs(spec, size).items()}
    if channels_last:
        for key in ("rgb", "depth"):
            if key in batch:
                batch[key] = batch[key].contiguous(memory_format=torch.channels_last)
    return batch


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=models.amp_dtype(device))


def _timed(steps: int, warmup: int, device: torch.device, step) -> float:
    """Seconds per step, after ``warmup`` untimed steps (kernel selection, allocator)."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def measure(spec: models.ModelSpec, variant: str, args: argparse.Namespace) -> tuple[float, float]:
    """Return (training, inference) images/s of ``spec`` under ``variant``."""
    channels_last, amp = VARIANTS[variant]
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = models.create_model(spec).to(device)
    if args.plain_swish:
        models.prepare_for_export(model).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch = _batch(spec, args.batch_size, device, channels_last)
    labels = torch.arange(args.batch_size, device=device) % spec.num_classes
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            loss = F.cross_entropy(model(batch), labels)
        loss.backward()
        optimizer.step()

    def infer_step() -> None:
        with torch.inference_mode(), _autocast(device, amp):
            model(batch)

    model.train()
    train = _timed(args.steps, args.warmup, device, train_step)
    model.eval()
    infer = _timed(args.steps, args.warmup, device, infer_step)
    return args.batch_size / train, args.batch_size / infer


def configurations(args: argparse.Namespace) -> Iterator[tuple[models.ModelSpec, str]]:
    for implementation in args.implementations:
        for backbone in args.backbones:
            for resolution in args.resolutions:
                spec = models.ModelSpec(
                    num_classes=10,
                    backbone=backbone,
                    resolution=resolution,
                    fusion=args.fusion,
                    modality=args.modality,
                    numeric_dim=8 if args.modality == "numeric" else None,
                    implementation=implementation,
                )
                for variant in args.variants:
                    yield spec, variant


def _csv(kind):
    return lambda text: [kind(item) for item in text.split(",") if item]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", type=_csv(str), default=["b0", "b1", "b2", "b3"])
    parser.add_argument("--resolutions", type=_csv(int), default=[64, 128, 224])
    parser.add_argument("--implementations", type=_csv(str), default=models.list_implementations())
    parser.add_argument(
        "--variants", type=_csv(str), default=list(VARIANTS), help=f"from {list(VARIANTS)}"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--fusion", default="none")
    parser.add_argument("--modality", default=None)
    parser.add_argument(
        "--plain-swish",
        action="store_true",
        help="efficientnet-pytorch: nn.SiLU instead of the memory-efficient Swish",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"device={args.device} threads={torch.get_num_threads()} batch={args.batch_size} "
        f"steps={args.steps} warmup={args.warmup} torch={torch.__version__}",
        flush=True,
    )
    results = []
    for spec, variant in configurations(args):
        train, infer = measure(spec, variant, args)
        result = Result(spec.implementation, spec.backbone, spec.resolution, variant, train, infer)
        results.append(result)
        print(
            f"{result.implementation:20} {result.backbone} {result.resolution:4}px "
            f"{variant:24} train {train:7.1f} img/s   infer {infer:7.1f} img/s",
            flush=True,
        )
    print("\n| implementation | backbone | px | variant | train img/s | infer img/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r.implementation} | {r.backbone} | {r.resolution} | {r.variant} "
            f"| {r.train:.1f} | {r.infer:.1f} |"
        )


if __name__ == "__main__":
    main()
