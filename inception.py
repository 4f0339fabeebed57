"""The FID Inception: pytorch-fid's port of the TF graph inception-2015-12-05 that the FID paper
used, written here in pytorch-fid's state-dict layout (566 tensors), and its weights.

    from inception import load_inception
    model = load_inception()             # downloads pt_inception-2015-12-05-6726825d.pth once (sha256 checked)
    features, logits = model(x, logits=True)   # x (N, 3, H, W) in [0, 1] -> (N, 2048), (N, 1008)

What makes it the FID variant and not torchvision's InceptionV3: TF's average pools that leave the
padding out (Mixed 5/6/7b), a max pool in Mixed_7c, BatchNorm eps 1e-3, 1008 outputs, inputs in
[-1, 1] after a bilinear resize to 299. evaluate.py scores images with it.
"""
import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import download

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


def conv_bn(cin, cout, kernel, stride=1, padding=0):
    """The graph's unit (torchvision's BasicConv2d): conv without bias, BatchNorm with TF's eps, ReLU."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, kernel, stride, padding, bias=False),
                                     bn=nn.BatchNorm2d(cout, eps=0.001), relu=nn.ReLU(inplace=True)))


def tf_avg_pool(x):
    # TF's average pool divides by the pixels inside the image, so the zero padding must not count
    # (torchvision's blocks count it; that and Mixed_7c's max pool are the FID variant's changes).
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b..5d (35x35): 1x1, 5x5, double 3x3 and pool branches."""
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = conv_bn(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = conv_bn(cin, 48, 1), conv_bn(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv_bn(cin, 64, 1)
        self.branch3x3dbl_2 = conv_bn(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv_bn(96, 96, 3, padding=1)
        self.branch_pool = conv_bn(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = conv_bn(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv_bn(cin, 64, 1)
        self.branch3x3dbl_2 = conv_bn(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv_bn(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (17x17): 7x7 convs factored into 1x7 and 7x1."""
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = conv_bn(cin, 192, 1)
        self.branch7x7_1 = conv_bn(cin, c7, 1)
        self.branch7x7_2, self.branch7x7_3 = conv_bn(c7, c7, **row), conv_bn(c7, 192, **col)
        self.branch7x7dbl_1 = conv_bn(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = conv_bn(c7, c7, **col), conv_bn(c7, c7, **row)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = conv_bn(c7, c7, **col), conv_bn(c7, 192, **row)
        self.branch_pool = conv_bn(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = conv_bn(cin, 192, 1), conv_bn(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv_bn(cin, 192, 1)
        self.branch7x7x3_2 = conv_bn(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv_bn(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv_bn(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b, 7c (8x8): 3x3 convs split into parallel 1x3 and 3x1 whose outputs are stacked."""
    def __init__(self, cin, max_pool=False):
        super().__init__()
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.branch1x1 = conv_bn(cin, 320, 1)
        self.branch3x3_1 = conv_bn(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = conv_bn(384, 384, **row), conv_bn(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = conv_bn(cin, 448, 1), conv_bn(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = conv_bn(384, 384, **row), conv_bn(384, 384, **col)
        self.branch_pool = conv_bn(cin, 192, 1)
        # The 2015 graph max-pools in Mixed_7c's pool branch (other Inceptions average): the
        # weights were trained so, hence FID depends on it.
        self.max_pool = max_pool

    def forward(self, x):
        b3, b3dbl = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl), self.branch_pool(pool)], 1)


class InceptionV3(nn.Module):
    """The FID Inception, without weights (load_inception gives them); state_dict keys are
    pytorch-fid's. Grey images: replicate them to 3 channels first (to_inception_input does)."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = conv_bn(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv_bn(32, 32, 3)
        self.Conv2d_2b_3x3 = conv_bn(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = conv_bn(64, 80, 1)
        self.Conv2d_4a_3x3 = conv_bn(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the graph's 1008 outputs: ImageNet's 1000 classes and unused slots

    def forward(self, x, logits=False):
        """(N, 3, H, W) in [0, 1] -> (N, 2048) pool features, and the (N, 1008) logits if asked."""
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(2 * x - 1)))  # the graph takes [-1, 1]
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (N, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        features = x.mean((2, 3))  # (N, 2048): the global average pool FID is computed on
        return (features, self.fc(features)) if logits else features


def load_inception(path=None, cache_dir=None, url=FID_WEIGHTS_URL, sha256=FID_WEIGHTS_SHA256):
    """InceptionV3 with pytorch-fid's weights, from `path`, else from the cache (downloaded there
    once, sha256 checked), in eval mode without gradients."""
    if path is None:
        cache_dir = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "vardistill"
        path = Path(cache_dir).expanduser() / "pt_inception-2015-12-05-6726825d.pth"
        if not path.exists():
            download(url, path, sha256)
    elif not Path(path).exists():
        raise SystemExit(f"no Inception weights at {path}: check the path, or call load_inception() "
                         f"without one to download them")
    model = InceptionV3()
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    except Exception as e:  # a damaged file, another pickle, missing or extra keys, other shapes
        why = " ".join(str(e).split()).rstrip(".")
        why = why if len(why) < 400 else why[:400] + " ..."
        raise SystemExit(f"{path} is not the FID Inception weights ({why}): replace it with {url} "
                         f"(sha256 {sha256}), or delete it if it is the cached copy") from None
    return model.eval().requires_grad_(False)
