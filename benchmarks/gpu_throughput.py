"""GPU throughput of stitchbench's inner loops, and the paper's Table 1 projected from it.

Run on a machine with a GPU (synthetic data, nothing downloaded):

    python benchmarks/gpu_throughput.py                      # prints the table
    python benchmarks/gpu_throughput.py --write tp.json      # also saves it for --dry-run
    stitchbench run --preset paper-table1-resnet18 --dry-run --data-dir ~/data --throughput tp.json

For ResNet-18 (width 64, CIFAR stem) and ViT-Ti (patch 4, width 192, depth 12) on
3x32x32 images it measures, in images per second:

- ``train``: a network's training step (forward + backward + Adam);
- ``forward``: inference (no gradients);
- ``tlm``: TLM's training step for stitchers at a spread of (source, target) layer
  pairs: the source front half under ``no_grad``, the stitching layer, the target's back
  half forward + backward, Adam on the stitcher only (exactly the loop of the ``tlm``
  matcher on augmented data, where the source activations cannot be cached).

From ``tlm`` it reports TLM stitcher-epochs per second (50,000 images per epoch) and the
projected GPU-hours of Table 1: 10 networks per architecture, every ordered layer pair,
intra-network (10 matrices) and inter-network (45 pairs, one direction), 30 epochs, DM's
forward passes included: 22,880 stitchers in all, as the paper counts them.
``--device cpu`` runs a short smoke check anywhere.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

ARCHS = {
    "resnet18": {"width": 64},
    "vit_tiny": {"image_size": 32, "patch_size": 4, "width": 192, "depth": 12, "num_heads": 3},
}
EPOCH_IMAGES = 50_000
TLM_EPOCHS = 30
NETWORKS = 10
DM_K = 100
TEST_IMAGES = 10_000


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(step: Any, batch: int, device: Any, seconds: float) -> float:
    """Images per second of ``step()`` (each call processes ``batch`` images), after warm-up."""
    for _ in range(3):
        step()
    _sync(device)
    n, start = 0, time.perf_counter()
    while True:
        step()
        n += 1
        if n >= 5 and time.perf_counter() - start >= seconds:
            break
    _sync(device)
    return n * batch / (time.perf_counter() - start)


def measure(arch: str, device: Any, batch: int, seconds: float, pairs: int, precision: str = "float32",
            channels_last: bool = False) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    import stitchbench
    from stitchbench.nn.stitching import StitchedNetwork, StitchingLayer

    plugin = stitchbench.get_plugin(arch, "architecture")
    torch.manual_seed(0)
    net = plugin.build(plugin.Params.model_validate(ARCHS[arch]), 10, (3, 32, 32)).to(device)
    x = torch.rand(batch, 3, 32, 32, device=device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = getattr(torch, precision)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=precision != "float32")
    y = torch.randint(0, 10, (batch,), device=device)

    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def train_step() -> None:
        net.train()
        with autocast():
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train = _rate(train_step, batch, device, seconds)
    net.eval()

    @torch.no_grad()
    def forward_step() -> None:
        with autocast():
            net(x)

    forward = _rate(forward_step, batch, device, seconds)

    layers = list(net.layer_names)
    shapes = net.layer_shapes((3, 32, 32))
    # a spread of cells: diagonal and off-diagonal, early and late
    cells = [(i, j) for i in range(len(layers)) for j in range(len(layers))]
    step = max(1, len(cells) // pairs)
    chosen = cells[::step][:pairs]
    rates = []
    for i, j in chosen:
        t = StitchingLayer(shapes[layers[i]], shapes[layers[j]]).to(device)
        stitched = StitchedNetwork(net, layers[i], t, net, layers[j])
        for p in net.parameters():
            p.requires_grad_(False)
        t_opt = torch.optim.Adam(t.parameters(), lr=1e-3)

        def tlm_step(stitched=stitched, t_opt=t_opt, layer=layers[i]) -> None:
            with torch.no_grad():
                h = net.front(x, layer)
            with autocast():  # as `tlm`: the receiver under autocast, T and the loss in float32
                logits = stitched.forward_from_source(h)
            loss = F.cross_entropy(logits.float(), y)
            t_opt.zero_grad(set_to_none=True)
            loss.backward()
            t_opt.step()

        rates.append(_rate(tlm_step, batch, device, seconds / 2))
        for p in net.parameters():
            p.requires_grad_(True)
    # the mean time per image over the cells -> the harmonic mean of the rates
    tlm = len(rates) / sum(1.0 / r for r in rates)
    return {
        "side": 32,
        "layers": len(layers),
        "train_images_per_s": train,
        "forward_images_per_s": forward,
        "tlm_images_per_s": tlm,
        "tlm_cells_measured": [[layers[i], layers[j]] for i, j in chosen],
        "tlm_stitcher_epochs_per_s": tlm / EPOCH_IMAGES,
    }


def table1_hours(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """GPU-hours of Table 1 (DM + TLM, intra + inter) from the measured rates."""
    out: dict[str, Any] = {}
    total = 0.0
    stitchers = 0
    for arch, r in results.items():
        matrices = NETWORKS + NETWORKS * (NETWORKS - 1) // 2
        cells = matrices * r["layers"] ** 2
        tlm_s = cells * (TLM_EPOCHS * EPOCH_IMAGES / r["tlm_images_per_s"]
                         + (DM_K + TEST_IMAGES) / r["forward_images_per_s"])
        dm_s = cells * (DM_K + TEST_IMAGES) / r["forward_images_per_s"]
        hours = (tlm_s + dm_s) / 3600
        out[arch] = {"stitchers": 2 * cells, "tlm_hours": tlm_s / 3600, "dm_hours": dm_s / 3600, "hours": hours}
        total += hours
        stitchers += 2 * cells
    out["total"] = {"stitchers": stitchers, "hours": total}
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke check")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    ap.add_argument("--pairs", type=int, default=6, help="layer pairs timed for TLM")
    ap.add_argument("--arch", action="append", choices=sorted(ARCHS), help="default: both")
    ap.add_argument("--precision", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="autocast dtype of the forward passes (tlm's `precision` param)")
    ap.add_argument("--channels-last", action="store_true", help="channels-last networks and inputs")
    ap.add_argument("--write", help="save the throughputs as JSON for `stitchbench run --dry-run --throughput`")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device is visible to torch; pass --device cpu for a smoke check")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results = {a: measure(a, device, args.batch, args.seconds, args.pairs, args.precision, args.channels_last)
               for a in (args.arch or list(ARCHS))}
    proj = table1_hours(results)
    layout = ", channels-last" if args.channels_last else ""
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch}; {args.precision}{layout}")
    print(f"{'architecture':12} {'train img/s':>12} {'forward img/s':>14} {'TLM img/s':>10} "
          f"{'TLM stitcher-epochs/s':>22} {'Table 1 GPU-h':>14}")
    for a, r in results.items():
        print(f"{a:12} {r['train_images_per_s']:12.0f} {r['forward_images_per_s']:14.0f} "
              f"{r['tlm_images_per_s']:10.0f} {r['tlm_stitcher_epochs_per_s']:22.4f} {proj[a]['hours']:14.1f}")
    print(f"Table 1 (ResNet-18 + ViT-Ti, intra + inter, DM + TLM, {proj['total']['stitchers']} stitchers, "
          f"{TLM_EPOCHS} TLM epochs of {EPOCH_IMAGES} images): {proj['total']['hours']:.1f} GPU-hours")
    if args.write:
        doc = {"device": name, "torch": torch.__version__, "batch": args.batch, "dtype": args.precision,
               "channels_last": args.channels_last,
               "date": time.strftime("%Y-%m-%d"), "architectures": results, "table1": proj}
        with open(args.write, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
