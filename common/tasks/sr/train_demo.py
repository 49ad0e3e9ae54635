"""Train the demo SwinIR ×2 (`assets/swinir_demo_x2.safetensors`): `python -m common.tasks.sr.train_demo`.

A small member of the SwinIR family (spandrel's = the official SwinIR code): embed 32, 2 RSTB × 2 Swin
layers, 4 heads, window 8, MLP ratio 2, the lightweight `pixelshuffledirect` upsampler (the classical
`pixelshuffle` tail with its fixed 64-channel convs would triple the weights and the CPU time), img_range 1,
about 70k parameters. Trained with L1 loss and Adam (cosine learning rate from 5e-4) for 240 steps of batch 8 on
32×32 LR patches (64×64 HR) of five real photos bundled with scikit-image (astronaut, chelsea, coffee, rocket,
immunohistochemistry), LR made by the MATLAB bicubic of `common.tasks.sr.imresize`, random crops and the 8
flip/rotation modes, all drawn from `--seed`, starting from `bilinear_init` (the output begins as bilinear ×2
upsampling). Set5 (the evaluation set of `task=sr`) is never seen. The result is reproducible for a given seed,
step count and torch build (CPU, float32); a few minutes on 2 free CPU cores (48×48 patches, the SwinIR
training size, work too: `--patch 48`, about 2× the time per step).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from .data import augment, skimage_photos, to_tensor
from .imresize import bicubic_down
from .metrics import modcrop

__all__ = ["DEMO_ARCH", "build_demo_net", "train", "main"]

ASSET = Path(__file__).resolve().parent / "assets" / "swinir_demo_x2.safetensors"
TRAIN_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")  # = data.SKIMAGE_PHOTOS
DEMO_ARCH = dict(img_size=16, embed_dim=32, depths=[2, 2], num_heads=[4, 4], window_size=8, mlp_ratio=2.0,
                 upscale=2, upsampler="pixelshuffledirect", img_range=1.0, resi_connection="1conv",
                 drop_path_rate=0.0)


def build_demo_net() -> torch.nn.Module:
    from spandrel.architectures.SwinIR.__arch.SwinIR import SwinIR

    return SwinIR(**DEMO_ARCH)


@torch.no_grad()
def bilinear_init(net: torch.nn.Module) -> None:
    """Start from bilinear ×2 upsampling (a short CPU training then only has to learn the residual detail):
    conv_first copies the (mean-subtracted) RGB into its first 3 channels, conv_after_body starts at zero (the
    transformer body is a zero residual, as in zero-init residual training), and the pixel-shuffle conv maps
    those 3 channels to the 4 sub-pixel phases with the separable bilinear taps (1/4, 3/4). The architecture
    and every other initial weight are SwinIR's own."""
    c_first, up = net.conv_first, net.upsample[0]
    c_first.weight[:3].zero_()
    c_first.bias[:3].zero_()
    for c in range(3):
        c_first.weight[c, c, 1, 1] = 1.0
    net.conv_after_body.weight.zero_()
    net.conv_after_body.bias.zero_()
    up.weight.zero_()
    up.bias.zero_()
    taps = {0: torch.tensor([0.25, 0.75, 0.0]), 1: torch.tensor([0.0, 0.75, 0.25])}
    for c in range(3):
        for dy in (0, 1):
            for dx in (0, 1):
                up.weight[c * 4 + dy * 2 + dx, c] = torch.outer(taps[dy], taps[dx])


def _batches(seed: int, steps: int, batch: int, patch: int, scale: int):
    rng = np.random.RandomState(seed)
    photos = [modcrop(img, scale) for _, img in skimage_photos(TRAIN_PHOTOS)]
    lrs = [bicubic_down(img, scale) for img in photos]
    for _ in range(steps):
        lr_b, hr_b = [], []
        for _ in range(batch):
            i = int(rng.randint(len(photos)))
            h, w = lrs[i].shape[:2]
            t, l, mode = int(rng.randint(h - patch + 1)), int(rng.randint(w - patch + 1)), int(rng.randint(8))
            lr_b.append(to_tensor(augment(lrs[i][t:t + patch, l:l + patch], mode)))
            hr_b.append(to_tensor(augment(photos[i][t * scale:(t + patch) * scale, l * scale:(l + patch) * scale], mode)))
        yield torch.stack(lr_b), torch.stack(hr_b)


def train(seed: int = 0, steps: int = 240, batch: int = 8, patch: int = 32, lr: float = 5e-4,
          log_every: int = 25) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    net = build_demo_net()
    bilinear_init(net)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    t0, run = time.time(), 0.0
    for step, (x, y) in enumerate(_batches(seed, steps, batch, patch, 2), 1):
        loss = (net(x) - y).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run = 0.9 * run + 0.1 * loss.item() if step > 1 else loss.item()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps} L1 {run:.4f} ({time.time() - t0:.0f}s)", flush=True)
    meta = {"seed": str(seed), "steps": str(steps), "batch": str(batch), "patch": str(patch), "lr": str(lr),
            "final_l1": f"{run:.5f}", "train_photos": ",".join(TRAIN_PHOTOS), "arch": repr(DEMO_ARCH)}
    return net.eval(), meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--patch", type=int, default=32, help="LR patch side")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--out", type=Path, default=ASSET)
    args = ap.parse_args(argv)
    from safetensors.torch import save_file

    net, meta = train(args.seed, args.steps, args.batch, args.patch, lr=args.lr)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata=meta)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
