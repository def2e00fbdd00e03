"""Train the embedded DToP segmenter on digit scenes (seeded; about 20 minutes on 2 CPU threads).

    python -m vtprune.embedded.train_dtop [--steps 1200] [--embed-dim 128] [--out vtprune/embedded/digits-dtop]

Every stage head is trained on every token (the dense forward), with SegViT's per-query losses: class
cross-entropy (query q's target is class q if present, else "no object", weighted 0.1), and for present classes
BCE + dice between its mask logits and the share of each patch the class covers; plus a cross-entropy on the
semantic scores that inference takes the argmax of. The authors first train the dense segmenter and then fine-tune
with exits switched on; here exits are only used at inference.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.data.digit_scenes import CLASSES, SceneSpec, scenes
from vtprune.embedded.segmenter import BACKBONE, SEGMENTER_DIR, build_segmenter, save_segmenter, to_tensor
from vtprune.eval.segmentation import evaluate_thresholds
from vtprune.methods.dtop import class_scores

NO_OBJECT_WEIGHT = 0.1
EVAL_THRESHOLDS = (1.0, 0.99, 0.98, 0.97, 0.95)


def patch_shares(labels: Tensor, patch: int, classes: int) -> Tensor:
    """``[B, H, W]`` class map -> ``[B, classes, h*w]``: the share of each patch each class covers."""
    one_hot = F.one_hot(labels, classes).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(one_hot, patch).flatten(2)


def stage_loss(class_logits: Tensor, mask_logits: Tensor, shares: Tensor) -> Tensor:
    classes = shares.shape[1]
    present = shares.sum(-1) > 0  # [B, C]
    targets = torch.where(present, torch.arange(classes).expand_as(present), classes)
    weights = torch.ones(classes + 1)
    weights[classes] = NO_OBJECT_WEIGHT
    class_loss = F.cross_entropy(class_logits.flatten(0, 1), targets.flatten(), weight=weights)
    logits, truth = mask_logits[present], shares[present]  # [P, N]
    bce = F.binary_cross_entropy_with_logits(logits, truth)
    probs = logits.sigmoid()
    dice = 1 - (2 * (probs * truth).sum(-1) + 1) / (probs.sum(-1) + truth.sum(-1) + 1)
    # the scores sum queries' votes, so they are not a distribution until normalised over classes
    scores = class_scores(class_logits, mask_logits) + 1e-6
    semantic_loss = F.nll_loss((scores / scores.sum(1, keepdim=True)).log(), shares.argmax(1))
    return class_loss + bce + dice.mean() + semantic_loss


def train(steps: int, out: Path | None, *, seed: int = 0, batch_size: int = 32, lr: float = 2e-3,
          threads: int | None = 2, eval_images: int = 300, log_every: int = 50, **backbone: int) -> dict:  # fmt: skip
    """Train, evaluate on held-out scenes at :data:`EVAL_THRESHOLDS`, save to ``out``; returns training.json.
    ``backbone`` overrides entries of :data:`BACKBONE` (``embed_dim``, ``depth``, ``num_heads``)."""
    unknown = set(backbone) - set(BACKBONE)
    if unknown:
        raise ValueError(f"backbone: unknown {sorted(unknown)}; allowed: {sorted(BACKBONE)}")
    backbone = {**BACKBONE, **backbone}
    recipe = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "backbone": backbone,
              "scenes": asdict(SceneSpec())}  # fmt: skip
    if threads:
        torch.set_num_threads(threads)
    model = build_segmenter(seed, backbone)
    patch = model.backbone.patch_embed.patch_size[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 12)

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    model.train()
    began = time.time()
    with torch.enable_grad():
        for step in range(steps):
            images, labels = scenes("train", step * batch_size, batch_size, seed=seed)
            shares = patch_shares(torch.from_numpy(labels), patch, len(CLASSES))
            losses = [stage_loss(c, m, shares) for c, m in model.stage_outputs(to_tensor(images))]
            loss = sum(losses)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            if log_every and (step + 1) % log_every == 0:
                stage_text = " ".join(f"{value.item():.3f}" for value in losses)
                print(f"step {step + 1}/{steps}  stage losses {stage_text}  {time.time() - began:.0f}s", flush=True)
    seconds = round(time.time() - began)
    model.eval()
    images, labels = scenes("test", 0, eval_images, seed=seed + 1000)
    rows = evaluate_thresholds(model, to_tensor(images), torch.from_numpy(labels), EVAL_THRESHOLDS)
    for row in rows:
        print(f"thresh {row['thresh']}: mIoU {row['miou']:.4f}  GFLOPs {row['gflops']:.4f}  "
              f"token-blocks {row['token_blocks']:.3f}", flush=True)  # fmt: skip
    record = {**recipe, "seconds": seconds, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "held_out": {"split": "test", "seed": seed + 1000, "images": eval_images, "rows": rows}}  # fmt: skip
    if out is not None:
        save_segmenter(model, Path(out), backbone, record)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-images", type=int, default=300)
    parser.add_argument("--out", type=Path, default=SEGMENTER_DIR)
    for name in ("embed_dim", "depth", "num_heads"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=BACKBONE[name])
    args = parser.parse_args()
    train(args.steps, args.out, seed=args.seed, batch_size=args.batch_size, lr=args.lr, threads=args.threads,
          eval_images=args.eval_images, embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads)  # fmt: skip


if __name__ == "__main__":
    main()
