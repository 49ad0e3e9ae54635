"""Train the embedded demo model ``vit_digits`` on the ``train`` split of the 8x8 digits.

Usage::

    python -m common.models.train_demo [--seed 0] [--epochs 200] [--out PATH]

Deterministic for a given seed (and thread count): torch, numpy and random are
seeded, ``torch.use_deterministic_algorithms(True)`` is on, and all shuffling and
augmentation draw from one seeded ``torch.Generator``. Only the ``train`` split is
used for training; ``calib_pool`` is never touched (it is reserved for PTQ
calibration) and ``test`` is only evaluated once, at the end.

Recipe: AdamW (lr 2e-3, weight decay 0.05), linear warm-up then cosine decay per
step, batch 64, 200 epochs, cross-entropy, random shifts of up to 1 pixel
(background padded), stochastic depth 0.1 (training only; it has no parameters, the
saved state dict is that of plain ``vit_digits()``). No quantization-robustness
tricks. The state dict is written with ``safetensors.torch.save_file`` (one sorted-JSON
metadata key, so the file is byte-reproducible) and the file's sha256 is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import pathlib
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.data.digits import DIGITS_MEAN, DIGITS_STD, digits_split
from common.models.demo import DEFAULT_WEIGHTS, vit_digits

BATCH_SIZE = 64
LR = 2e-3
WEIGHT_DECAY = 0.05
WARMUP_EPOCHS = 5
MAX_SHIFT = 1
DROP_PATH = 0.1
BACKGROUND = (0.0 - DIGITS_MEAN) / DIGITS_STD  # normalised value of an empty pixel (-1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; turn on deterministic algorithms where supported."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        torch.use_deterministic_algorithms(True)
    except Exception as exc:  # pragma: no cover - CPU supports it; keep going if not
        print(f"warning: deterministic algorithms unavailable: {exc}", file=sys.stderr)


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """Shift every image by its own random (dy, dx) in [-max_shift, max_shift], padding with background."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    s = max_shift
    padded = F.pad(x, (s, s, s, s), value=BACKGROUND)
    offsets = torch.randint(0, 2 * s + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for dy in range(2 * s + 1):
        for dx in range(2 * s + 1):
            mask = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            if mask.any():
                out[mask] = padded[mask, :, dy : dy + h, dx : dx + w]
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 200) -> float:
    """Top-1 accuracy (fraction) of ``model`` in eval mode."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum().item()
    return correct / len(x)


def sha256_file(path: pathlib.Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def train(seed: int = 0, epochs: int = 200, out: pathlib.Path = DEFAULT_WEIGHTS) -> dict:
    """Train ``vit_digits``, save its state dict to ``out``; return a summary dict."""
    from safetensors.torch import save_file

    seed_everything(seed)
    data = digits_split(seed)
    x_train, y_train = data["train"]
    x_test, y_test = data["test"]

    model = vit_digits(drop_path_rate=DROP_PATH)  # stochastic depth: training-only, no parameters
    n_params = sum(p.numel() for p in model.parameters())
    # no weight decay on biases, norms, cls token and pos embed (standard ViT practice)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("cls_token", "pos_embed") else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=LR
    )
    steps_per_epoch = math.ceil(len(x_train) / BATCH_SIZE)
    total, warmup = epochs * steps_per_epoch, WARMUP_EPOCHS * steps_per_epoch

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    gen = torch.Generator().manual_seed(seed)

    print(f"vit_digits: {n_params} params, train {len(x_train)}, test {len(x_test)}, "
          f"epochs {epochs}, seed {seed}, threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc="train", unit="ep", file=sys.stderr)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(x_train), BATCH_SIZE):
            idx = perm[i : i + BATCH_SIZE]
            xb, yb = random_shift(x_train[idx], gen), y_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(-1) == yb).sum().item()
        loss_avg, acc = loss_sum / len(x_train), correct / len(x_train)
        bar.set_postfix(loss=f"{loss_avg:.4f}", acc=f"{acc:.3f}")
        tqdm.write(f"epoch {epoch + 1:4d}/{epochs}  loss {loss_avg:.4f}  train_acc {acc:.4f}  "
                   f"lr {sched.get_last_lr()[0]:.2e}")
    train_time = time.perf_counter() - t0

    test_acc = evaluate(model, x_test, y_test)
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # One metadata key holding sorted JSON: safetensors writes a multi-key metadata map in
    # arbitrary (per-process) order, which would make the file's sha256 irreproducible.
    info = {"arch": "vit_digits", "seed": seed, "epochs": epochs, "test_acc": round(test_acc, 6)}
    save_file(state, str(out), metadata={"vit_digits_train": json.dumps(info, sort_keys=True)})
    digest = sha256_file(out)
    print(f"train time {train_time:.1f} s")
    print(f"test accuracy {test_acc * 100:.2f}% ({round(test_acc * len(x_test))}/{len(x_test)})")
    print(f"saved {out} ({out.stat().st_size} bytes) sha256 {digest}")
    return {"test_acc": test_acc, "train_time_s": train_time, "sha256": digest, "path": str(out),
            "params": n_params}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_WEIGHTS)
    args = p.parse_args(argv)
    train(seed=args.seed, epochs=args.epochs, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
