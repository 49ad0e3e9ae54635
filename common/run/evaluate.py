"""Evaluation: logits over a loader and the FP-vs-quantized comparison metrics."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["predict", "topk_accuracy", "compare_to_fp"]


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
            desc: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and labels over the whole loader, model in eval mode."""
    model.eval()
    logits, labels = [], []
    for images, y in tqdm(loader, desc=desc, leave=False, mininterval=2.0):
        logits.append(model(images.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy in percent."""
    k = min(k, logits.shape[1])
    hit = (logits.topk(k, dim=1).indices == labels[:, None]).any(1)
    return 100.0 * hit.float().mean().item()


def compare_to_fp(fp_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracies of both models, top-1 agreement (%) and mean KL(p_fp ‖ p_q) in nats."""
    kl = F.kl_div(F.log_softmax(q_logits.double(), 1), F.log_softmax(fp_logits.double(), 1),
                  log_target=True, reduction="batchmean")
    return {
        "fp_top1": topk_accuracy(fp_logits, labels, 1),
        "fp_top5": topk_accuracy(fp_logits, labels, 5),
        "quant_top1": topk_accuracy(q_logits, labels, 1),
        "quant_top5": topk_accuracy(q_logits, labels, 5),
        "top1_agreement": 100.0 * (fp_logits.argmax(1) == q_logits.argmax(1)).float().mean().item(),
        "kl_to_fp": float(kl),
    }
