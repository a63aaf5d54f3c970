"""Self-contained PyTorch twin of the reference DVA's frozen face encoders (eval, NCHW).

State-dict keys match the reference exactly (``idnet.backbone.*``, ``lndnet.backbone.*``,
``bgnet.backbone.*`` and optionally ``linear.*``), so the golden / published state dicts
load with ``strict=True``. No torchvision dependency: MobileNetV2 is rebuilt with
torchvision's module nesting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from s3jax.models.face_encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IRSE50_UNITS,
    MASK_BACKGROUND_CLASSES,
    MOBILENET_V2_BLOCKS,
    VIDEO_MASK_EXTRA_BACKGROUND_CLASSES,
)


# ----------------------------------------------------------------------------------------
# IR-SE50
# ----------------------------------------------------------------------------------------
class _SE(nn.Module):

  def __init__(self, c: int, reduction: int = 16):
    super().__init__()
    self.fc1 = nn.Conv2d(c, c // reduction, 1, bias=False)
    self.fc2 = nn.Conv2d(c // reduction, c, 1, bias=False)

  def forward(self, x):
    s = x.mean(dim=(2, 3), keepdim=True)
    return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class _BottleneckIRSE(nn.Module):

  def __init__(self, cin: int, depth: int, stride: int):
    super().__init__()
    if cin == depth:
      self.shortcut_layer = nn.MaxPool2d(1, stride)
    else:
      self.shortcut_layer = nn.Sequential(
          nn.Conv2d(cin, depth, 1, stride, bias=False), nn.BatchNorm2d(depth)
      )
    self.res_layer = nn.Sequential(
        nn.BatchNorm2d(cin),
        nn.Conv2d(cin, depth, 3, 1, 1, bias=False),
        nn.PReLU(depth),
        nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
        nn.BatchNorm2d(depth),
        _SE(depth),
    )

  def forward(self, x):
    return self.res_layer(x) + self.shortcut_layer(x)


class IRSE50(nn.Module):
  """IR-SE50 ``Backbone(112, 50, 'ir_se')``: (N,3,112,112) -> L2-normalised (N,512)."""

  def __init__(self):
    super().__init__()
    self.input_layer = nn.Sequential(
        nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)
    )
    self.output_layer = nn.Sequential(
        nn.BatchNorm2d(512),
        nn.Dropout(0.6),
        nn.Flatten(),
        nn.Linear(512 * 7 * 7, 512),
        nn.BatchNorm1d(512),
    )
    self.body = nn.Sequential(*[_BottleneckIRSE(*u) for u in IRSE50_UNITS])

  def forward(self, x):
    x = self.output_layer(self.body(self.input_layer(x)))
    return x / torch.norm(x, 2, 1, True)


# ----------------------------------------------------------------------------------------
# MobileNetV2-GDConv
# ----------------------------------------------------------------------------------------
def _conv_bn_relu6(cin, cout, k=3, stride=1, groups=1):
  return nn.Sequential(
      nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
      nn.BatchNorm2d(cout),
      nn.ReLU6(inplace=False),
  )


class _InvertedResidual(nn.Module):

  def __init__(self, cin, cout, stride, t):
    super().__init__()
    hidden = cin * t
    self.use_res = stride == 1 and cin == cout
    layers = [] if t == 1 else [_conv_bn_relu6(cin, hidden, 1)]
    layers += [
        _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
        nn.Conv2d(hidden, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
    ]
    self.conv = nn.Sequential(*layers)

  def forward(self, x):
    return x + self.conv(x) if self.use_res else self.conv(x)


class _MobileNetV2(nn.Module):

  def __init__(self):
    super().__init__()
    feats = [_conv_bn_relu6(3, 32, 3, 2)]
    feats += [_InvertedResidual(*b) for b in MOBILENET_V2_BLOCKS]
    feats += [_conv_bn_relu6(320, 1280, 1)]
    self.features = nn.Sequential(*feats)
    self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))


class _ConvBlock(nn.Module):

  def __init__(self, cin, cout, k, groups=1):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, 1, 0, groups=groups, bias=False)
    self.bn = nn.BatchNorm2d(cout)

  def forward(self, x):
    return self.bn(self.conv(x))


class MobileNetGDConv(nn.Module):
  """``MobileNet_GDConv(136)``: (N,3,224,224) ImageNet-normalised -> (N,136).

  Like the reference, ``base_net`` shares its modules with ``pretrain_net.features``, so
  both key sets appear in the state dict and the later one (``base_net.0``) wins on load.
  """

  def __init__(self, num_outputs: int = 136):
    super().__init__()
    self.pretrain_net = _MobileNetV2()
    self.base_net = nn.Sequential(self.pretrain_net.features)
    self.linear7 = _ConvBlock(1280, 1280, 7, groups=1280)
    self.linear1 = _ConvBlock(1280, num_outputs, 1)

  def forward(self, x):
    x = self.linear1(self.linear7(self.base_net(x)))
    return x.view(x.size(0), -1)


# ----------------------------------------------------------------------------------------
# BiSeNet
# ----------------------------------------------------------------------------------------
class _BasicBlock(nn.Module):

  def __init__(self, cin, cout, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.downsample = None
    if cin != cout or stride != 1:
      self.downsample = nn.Sequential(
          nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
      )

  def forward(self, x):
    r = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    s = x if self.downsample is None else self.downsample(x)
    return F.relu(s + r)


class _ResNet18(nn.Module):

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = nn.Sequential(_BasicBlock(64, 64), _BasicBlock(64, 64))
    self.layer2 = nn.Sequential(_BasicBlock(64, 128, 2), _BasicBlock(128, 128))
    self.layer3 = nn.Sequential(_BasicBlock(128, 256, 2), _BasicBlock(256, 256))
    self.layer4 = nn.Sequential(_BasicBlock(256, 512, 2), _BasicBlock(512, 512))

  def forward(self, x):
    x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
    f8 = self.layer2(x)
    f16 = self.layer3(f8)
    return f8, f16, self.layer4(f16)


class _ConvBNReLU(nn.Module):

  def __init__(self, cin, cout, k=3, stride=1, padding=1):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, stride, padding, bias=False)
    self.bn = nn.BatchNorm2d(cout)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class _ARM(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.conv = _ConvBNReLU(cin, cout)
    self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
    self.bn_atten = nn.BatchNorm2d(cout)

  def forward(self, x):
    feat = self.conv(x)
    a = torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean(dim=(2, 3), keepdim=True))))
    return feat * a


class _ContextPath(nn.Module):

  def __init__(self):
    super().__init__()
    self.resnet = _ResNet18()
    self.arm16 = _ARM(256, 128)
    self.arm32 = _ARM(512, 128)
    self.conv_head32 = _ConvBNReLU(128, 128)
    self.conv_head16 = _ConvBNReLU(128, 128)
    self.conv_avg = _ConvBNReLU(512, 128, 1, 1, 0)

  def forward(self, x):
    f8, f16, f32 = self.resnet(x)
    avg = self.conv_avg(f32.mean(dim=(2, 3), keepdim=True))
    avg_up = F.interpolate(avg, f32.shape[2:], mode="nearest")
    f32_up = F.interpolate(self.arm32(f32) + avg_up, f16.shape[2:], mode="nearest")
    f32_up = self.conv_head32(f32_up)
    f16_up = F.interpolate(self.arm16(f16) + f32_up, f8.shape[2:], mode="nearest")
    return f8, self.conv_head16(f16_up), f32_up


class _FFM(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.convblk = _ConvBNReLU(cin, cout, 1, 1, 0)
    self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
    self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

  def forward(self, fsp, fcp):
    feat = self.convblk(torch.cat([fsp, fcp], dim=1))
    a = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean(dim=(2, 3), keepdim=True)))))
    return feat * a + feat


class _BiSeNetOutput(nn.Module):

  def __init__(self, cin, mid, n_classes):
    super().__init__()
    self.conv = _ConvBNReLU(cin, mid)
    self.conv_out = nn.Conv2d(mid, n_classes, 1, bias=False)

  def forward(self, x):
    return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
  """``BiSeNet(19)``: ImageNet-normalised NCHW -> three logit maps at input size."""

  def __init__(self, n_classes: int = 19):
    super().__init__()
    self.cp = _ContextPath()
    self.ffm = _FFM(256, 256)
    self.conv_out = _BiSeNetOutput(256, 256, n_classes)
    self.conv_out16 = _BiSeNetOutput(128, 64, n_classes)
    self.conv_out32 = _BiSeNetOutput(128, 64, n_classes)

  def forward(self, x):
    h, w = x.shape[2:]
    f8, cp8, cp16 = self.cp(x)
    outs = (self.conv_out(self.ffm(f8, cp8)), self.conv_out16(cp8), self.conv_out32(cp16))
    return tuple(F.interpolate(o, (h, w), mode="bilinear", align_corners=True) for o in outs)


# ----------------------------------------------------------------------------------------
# Wrapper
# ----------------------------------------------------------------------------------------
class _Holder(nn.Module):
  """Gives the ``<net>.backbone.*`` key prefix of the reference's IDnet/LNDnet/BGnet."""

  def __init__(self, backbone: nn.Module):
    super().__init__()
    self.backbone = backbone


class OfficialEncoders(nn.Module):
  """Twin of the reference ``DiffusionVideoAutoencoder`` (NCHW in [-1, 1], 256 px).

  ``with_linear=True`` adds ``linear`` (614 -> 512) so ``z_face`` can be computed and the
  golden ``encoders_state_dict`` loads strictly as a whole.
  """

  def __init__(self, with_linear: bool = True):
    super().__init__()
    self.idnet = _Holder(IRSE50())
    self.lndnet = _Holder(MobileNetGDConv(136))
    self.bgnet = _Holder(BiSeNet(19))
    self.linear = nn.Linear(614, 512) if with_linear else None
    self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
    self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)
    self.eval()
    self.requires_grad_(False)

  def id_feats(self, x):
    if x.shape[2] != 256:
      x = F.adaptive_avg_pool2d(x, (256, 256))
    x = F.adaptive_avg_pool2d(x[:, :, 35:223, 32:220], (112, 112))
    return self.idnet.backbone(x)

  def lnd_feats(self, x):
    if x.shape[2] != 224:
      x = x[:, :, 16:240, 16:240]
    out = self.lndnet.backbone(((x + 1) / 2 - self.mean) / self.std)
    return out.clamp(0, 1).reshape(-1, 68, 2)[:, 17:, :].reshape(x.size(0), -1)

  def parsing(self, x):
    x = F.interpolate(x, (512, 512), mode="nearest")
    x = (x.clip(-1, 1).add(1).div(2) - self.mean) / self.std
    return self.bgnet.backbone(x)[0].argmax(dim=1, keepdim=True)

  @staticmethod
  def mask_from_parsing(seg, for_video=False, size=(256, 256)):
    classes = MASK_BACKGROUND_CLASSES + (VIDEO_MASK_EXTRA_BACKGROUND_CLASSES if for_video else ())
    fg = torch.stack([seg != c for c in classes], dim=0).all(dim=0)
    return F.interpolate(fg.float(), size, mode="nearest")

  def face_mask(self, x, for_video=False):
    return self.mask_from_parsing(self.parsing(x), for_video)

  def z_face(self, id_feats, lnd_feats):
    return self.linear(torch.cat([id_feats, lnd_feats], dim=1))

  @torch.no_grad()
  def forward(self, x):
    out = {"id_feats": self.id_feats(x), "lnd_feats": self.lnd_feats(x)}
    seg = self.parsing(x)
    out["face_mask"] = self.mask_from_parsing(seg, False)
    out["face_mask_video"] = self.mask_from_parsing(seg, True)
    if self.linear is not None:
      out["z_face"] = self.z_face(out["id_feats"], out["lnd_feats"])
    return out


def load_official_encoders(state_dict, with_linear: bool = True) -> OfficialEncoders:
  """Build the twin and load ``state_dict`` (numpy arrays or tensors) with ``strict=True``."""
  model = OfficialEncoders(with_linear=with_linear)
  sd = {k: torch.as_tensor(v) for k, v in state_dict.items()}
  model.load_state_dict(sd, strict=True)
  return model.eval()
