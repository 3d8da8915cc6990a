"""polypwatch-train's network rebuilt in PyTorch, timed on the same training step.

DeepLabv3+ with a ResNet-18 encoder at width 0.5 (channels 32-64-128-256, output stride 16 with
the last stage dilated), ASPP rates 1/6/12/18 of 128 filters plus image pooling, 48 low-level
filters, two 3x3 decoder convolutions of 64, a 1x1 head, bilinear upsampling with half-pixel
centres; BCE-with-logits + soft Dice (per image, smoothed by 1); Adam (lr 2e-3, weight decay
1e-5 as L2). Batch 8 of 192x192 random normal pixels with one random disc of polyp each,
a fixed batch as `polypwatch-train bench` uses. Prints one JSON line like the Rust bench.

  python bench/torch_train.py --threads 1 [--channels-last] [--warmup 5 --steps 30]
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(cin, cout, k, stride=1, dilation=1, act=True):
    pad = dilation * (k - 1) // 2
    layers = [nn.Conv2d(cin, cout, k, stride, pad, dilation, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Basic(nn.Module):
    def __init__(self, cin, cout, stride, dilation):
        super().__init__()
        self.a = conv_bn(cin, cout, 3, stride, dilation)
        self.b = conv_bn(cout, cout, 3, 1, dilation, act=False)
        self.down = conv_bn(cin, cout, 1, stride, act=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        s = x if self.down is None else self.down(x)
        return F.relu(self.b(self.a(x)) + s)


class DeepLab(nn.Module):
    def __init__(self, width=0.5, rates=(1, 6, 12, 18), aspp=128, low=48, dec=64):
        super().__init__()
        sc = lambda c: max(8, round(c * width / 8) * 8)
        self.stem = conv_bn(3, sc(64), 7, 2)
        blocks, cin = [], sc(64)
        for si, (planes, stride, dil) in enumerate([(64, 1, 1), (128, 2, 1), (256, 2, 1), (512, 1, 2)]):
            for bi in range(2):
                blocks.append(Basic(cin, sc(planes), stride if bi == 0 else 1, dil))
                cin = sc(planes)
            if si == 0:
                self.low_at, low_c = len(blocks), cin
        self.blocks = nn.ModuleList(blocks)
        self.branches = nn.ModuleList(
            [conv_bn(cin, aspp, 1) if r == 1 else conv_bn(cin, aspp, 3, 1, r) for r in rates])
        self.pooling = conv_bn(cin, aspp, 1)
        self.project = conv_bn(aspp * (len(rates) + 1), aspp, 1)
        self.low_project = conv_bn(low_c, low, 1)
        self.decoder = nn.Sequential(conv_bn(aspp + low, dec, 3), conv_bn(dec, dec, 3))
        self.head = nn.Conv2d(dec, 1, 1)

    def forward(self, x):
        h, w = x.shape[2:]
        y = F.max_pool2d(self.stem(x), 3, 2, 1)
        for i, b in enumerate(self.blocks):
            y = b(y)
            if i + 1 == self.low_at:
                low = y
        outs = [b(y) for b in self.branches]
        p = self.pooling(y.mean((2, 3), keepdim=True))
        outs.append(p.expand(-1, -1, y.shape[2], y.shape[3]))
        high = self.project(torch.cat(outs, 1))
        low = self.low_project(low)
        y = torch.cat([F.interpolate(high, size=low.shape[2:], mode="bilinear", align_corners=False), low], 1)
        return F.interpolate(self.head(self.decoder(y)), size=(h, w), mode="bilinear", align_corners=False)


def loss_fn(logits, target):
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + dice.mean()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=192)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = DeepLab()
    x = torch.randn(a.batch, 3, a.crop, a.crop)
    yy, xx = torch.meshgrid(torch.arange(a.crop), torch.arange(a.crop), indexing="ij")
    y = torch.zeros(a.batch, 1, a.crop, a.crop)
    for i in range(a.batch):
        cy, cx = torch.randint(0, a.crop, (2,)).tolist()
        r = int(torch.randint(a.crop // 8, a.crop // 3, (1,)))
        y[i, 0] = (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).float()
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-5)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    times, losses = [], []
    for _ in range(a.warmup + a.steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        l = loss_fn(model(x), y)
        l.backward()
        opt.step()
        losses.append(float(l.detach()))
        times.append(time.perf_counter() - t)
    timed = times[a.warmup:]
    print(json.dumps({
        "runtime": "pytorch" + (" channels_last" if a.channels_last else ""),
        "torch": torch.__version__, "parameters": params, "batch": a.batch, "crop": a.crop,
        "threads": torch.get_num_threads(), "steps": a.steps,
        "images_per_s": a.steps * a.batch / sum(timed),
        "step_s_median": sorted(timed)[len(timed) // 2], "losses": losses,
    }))


if __name__ == "__main__":
    main()
