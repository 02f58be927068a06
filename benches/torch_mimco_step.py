"""The PyTorch baseline of `mimco bench train`: the same MimCo step in PyTorch + timm, run on
the same GPU by benches/gpu.sh, so that both figures come from one card.

Per step, like mimco's: upload a uint8 batch (from pinned memory), normalise on the GPU,
frozen teacher forward (no grad), student forward with SimMIM's mask token, patch-level
InfoNCE over the masked tokens and image-level InfoNCE against 4096-key queues (p1/p2 heads
4096 wide, p3 = EMA of p1), backward, clip at 5.0, fused AdamW, EMA update, loss read back.
bf16 autocast; `--compile` wraps the student and teacher in torch.compile.

    python3 benches/torch_mimco_step.py --dim 384 --heads 6 --teacher-heads 12 --batch 256
"""

import argparse
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer


def vit(dim, heads):
    return VisionTransformer(img_size=224, patch_size=16, embed_dim=dim, depth=12,
                             num_heads=heads, num_classes=0, global_pool="")


def encode(model, images, mask=None, token=None):
    x = model.patch_embed(images)
    if mask is not None:
        m = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1 - m) + token.to(x.dtype) * m
    x = model._pos_embed(x)
    x = model.blocks(x)
    return model.norm(x)[:, 1:]


def mlp(i, h, o):
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(inplace=True), nn.Linear(h, o))


def info_nce(q, k, queue, tau=0.2):
    q = F.normalize(q.float(), dim=-1)
    k = F.normalize(k.float(), dim=-1)
    logits = torch.cat([(q * k).sum(-1, keepdim=True), q @ queue.t()], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--teacher-heads", type=int, default=12)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    student, teacher = vit(a.dim, a.heads).to(dev), vit(a.dim, a.teacher_heads).to(dev)
    teacher.requires_grad_(False).eval()
    token = nn.Parameter(torch.zeros(1, 1, a.dim, device=dev))
    p1 = {lvl: mlp(a.dim, 4096, 256).to(dev) for lvl in ("patch", "image")}
    p2 = {lvl: mlp(256, 4096, 256).to(dev) for lvl in ("patch", "image")}
    p3 = {lvl: copy.deepcopy(p1[lvl]).requires_grad_(False) for lvl in p1}
    queues = {lvl: F.normalize(torch.randn(4096, 256, device=dev), dim=1) for lvl in p1}
    params = [token, *student.parameters()]
    for lvl in p1:
        params += [*p1[lvl].parameters(), *p2[lvl].parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=True)
    enc_s, enc_t = encode, encode
    if a.compile:
        enc_s, enc_t = torch.compile(encode), torch.compile(encode)
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1) * 255
    host = [torch.randint(0, 256, (a.batch, 3, 224, 224), dtype=torch.uint8).pin_memory()
            for _ in range(2)]
    n = 196

    def step(i):
        x = host[i % 2].to(dev, non_blocking=True).float().sub_(mean).div_(std)
        mask = torch.rand(a.batch, n, device=dev).argsort(1) < int(0.6 * n)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                zk = enc_t(teacher, x)
            z = enc_s(student, x, mask, token)
            loss = 0
            for lvl in p1:
                if lvl == "patch":
                    zq, zkk = z[mask], zk
                else:
                    zq, zkk = z.mean(1), zk.mean(1)
                q = p2[lvl](p1[lvl](zq))
                with torch.no_grad():
                    k = p3[lvl](zkk)
                    if lvl == "patch":
                        keys = F.normalize(k.float(), dim=-1).mean(1)
                        k = k[mask]
                    else:
                        keys = k.float()
                loss = loss + info_nce(q, k, queues[lvl])
                queues[lvl] = torch.cat([F.normalize(keys, dim=-1), queues[lvl]])[:4096]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        with torch.no_grad():
            for lvl in p1:
                for e, s in zip(p3[lvl].parameters(), p1[lvl].parameters()):
                    e.mul_(0.99).add_(s, alpha=0.01)
        return loss.item()

    for i in range(a.warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(a.steps):
        step(i)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    gib = 2**30
    print(f"| pytorch {torch.__version__}{' compile' if a.compile else ' eager'} | dim {a.dim} "
          f"| bf16 autocast | batch {a.batch} | {a.steps * a.batch / dt:.0f} images/s "
          f"| {1e3 * dt / a.steps:.1f} ms/step "
          f"| peak allocated {torch.cuda.max_memory_allocated() / gib:.1f} GiB, "
          f"reserved {torch.cuda.max_memory_reserved() / gib:.1f} GiB |", flush=True)


if __name__ == "__main__":
    main()
