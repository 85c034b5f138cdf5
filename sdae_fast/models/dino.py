"""DINO (Caron et al., ICCV 2021): self-distillation with no labels (SPEC §6, §7).

* :class:`MultiCrop` makes 2 global + n local random resized crops (with horizontal flips) of an
  image batch on its device, all crops of one size in one ``affine_grid``/``grid_sample``. DINO's
  colour jitter, blur and solarisation are left to the data pipeline.
* :class:`~sdae_fast.models.dino_head.DINOHead`: the official head (``use_bn_in_head``,
  ``norm_last_layer``; PyTorch's default init for the weight-normalised last layer).
* Student = encoder + head on every crop; teacher = their EMA (0.996 -> 1, cosine per iteration)
  on the global crops. As officially (main_dino.py) the teacher starts as a copy of the student,
  has no drop_path, and every parameter pair is averaged. Without BatchNorm in the head the
  teacher's train mode computes what eval does, so it runs in eval; with ``use_bn_in_head`` it
  runs in train mode (batch statistics), as the official teacher does; ``dino_loss`` with the centre buffer updated in place and the teacher
  temperature warmed up linearly over ``warmup_teacher_temp_epochs``.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.dino_loss import dino_loss
from .dino_head import DINOHead
from .teacher import EmaTeacherMixin
from .vit import VisionTransformer


class MultiCrop(nn.Module):
    """Random resized crops + flips with torch ops, using the global RNG on the images' device."""

    def __init__(self, global_size: int = 224, local_size: int = 96, num_local: int = 8,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), ratio=(3 / 4, 4 / 3), flip_p: float = 0.5):
        super().__init__()
        self.global_size, self.local_size, self.num_local = global_size, local_size, num_local
        self.global_scale, self.local_scale, self.ratio, self.flip_p = global_scale, local_scale, ratio, flip_p

    def crops(self, imgs: torch.Tensor, n: int, size: int, scale) -> torch.Tensor:
        """``n`` crops of every image, view-major: (n·B, C, size, size)."""
        b, c, h, w = imgs.shape
        rows, dev = n * b, imgs.device
        area = torch.empty(rows, device=dev).uniform_(*scale)  # fraction of the image area
        log_r = torch.empty(rows, device=dev).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = log_r.exp()  # width / height of the crop, in pixels
        cw = (area * h * w * aspect).sqrt().clamp(max=w) / w  # crop width as a fraction of the image width
        ch = (area * h * w / aspect).sqrt().clamp(max=h) / h
        cx = (torch.rand(rows, device=dev) * 2 - 1) * (1 - cw)  # crop centre in [-1, 1] coordinates
        cy = (torch.rand(rows, device=dev) * 2 - 1) * (1 - ch)
        flip = torch.where(torch.rand(rows, device=dev) < self.flip_p, -1.0, 1.0)
        theta = torch.zeros(rows, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = cw * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = ch, cy
        grid = F.affine_grid(theta, (rows, c, size, size), align_corners=False)  # (n·B, s, s, 2)
        # Stack the n crops of an image along the output height so the images are read as they
        # are (no n-fold copy of the batch): grid (B, n·s, s, 2) -> samples (B, C, n·s, s).
        grid = grid.reshape(n, b, size, size, 2).transpose(0, 1).reshape(b, n * size, size, 2)
        src = imgs.float()
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        out = out.reshape(b, c, n, size, size).permute(2, 0, 1, 3, 4).reshape(rows, c, size, size)
        return out.to(imgs.dtype)

    def forward(self, imgs: torch.Tensor):
        """(global crops (2·B, C, g, g), local crops (n·B, C, l, l) or None), crop-major."""
        glob = self.crops(imgs, 2, self.global_size, self.global_scale)
        local = self.crops(imgs, self.num_local, self.local_size, self.local_scale) if self.num_local else None
        return glob, local


class DINO(EmaTeacherMixin, nn.Module):
    OPS_USED = ("dino_loss",)

    def __init__(self, encoder: VisionTransformer, *, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm_last_layer: bool = True, use_bn_in_head: bool = False, global_size: int | None = None,
                 local_size: int | None = None, num_local: int = 8, global_scale=(0.4, 1.0),
                 local_scale=(0.05, 0.4), student_temp: float = 0.1, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float | None = None, warmup_teacher_temp_epochs: int = 0,
                 center_momentum: float = 0.9, base_momentum: float = 0.996, final_momentum: float = 1.0,
                 backend: str | None = None):
        """Crop sizes default to the encoder's image size and 96/224 of it for local crops.
        ``warmup_teacher_temp`` (e.g. 0.04 with teacher_temp 0.07) ramps linearly per epoch."""
        super().__init__()
        self.encoder, self.backend = encoder, backend
        gsize = global_size or encoder.img_size
        lsize = local_size or max(encoder.patch_size, round(gsize * 96 / 224 / encoder.patch_size) * encoder.patch_size)
        self.multicrop = MultiCrop(gsize, lsize, num_local, global_scale, local_scale)
        self.head = DINOHead(encoder.embed_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer=norm_last_layer,
                             use_bn=use_bn_in_head)
        teacher = copy.deepcopy(encoder)
        for blk in teacher.blocks:  # main_dino.py builds the teacher ViT without drop_path_rate
            blk.drop_path.rate = 0.0
        self.teacher = nn.ModuleDict({"encoder": teacher, "head": copy.deepcopy(self.head)})
        self.teacher_train_mode = use_bn_in_head
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.student_temp, self.teacher_temp, self.center_momentum = student_temp, teacher_temp, center_momentum
        self.warmup_teacher_temp, self.warmup_teacher_temp_epochs = warmup_teacher_temp, warmup_teacher_temp_epochs
        self._init_ema(base_momentum=base_momentum, final_momentum=final_momentum, per="iteration")

    def current_teacher_temp(self) -> float:
        if self.warmup_teacher_temp is None or self.warmup_teacher_temp_epochs <= 0:
            return self.teacher_temp
        epoch = self.step // self.steps_per_epoch
        if epoch >= self.warmup_teacher_temp_epochs:
            return self.teacher_temp
        frac = epoch / max(self.warmup_teacher_temp_epochs - 1, 1)
        return self.warmup_teacher_temp + frac * (self.teacher_temp - self.warmup_teacher_temp)

    @staticmethod
    def _embed(encoder, head, crops) -> torch.Tensor:
        # Crops of one resolution go through the encoder together (DINO's MultiCropWrapper).
        feats = torch.cat([encoder.embed(c) for c in crops if c is not None])
        return head(feats)

    def forward(self, imgs: torch.Tensor) -> dict:
        glob, local = self.multicrop(imgs)
        student_out = self._embed(self.encoder, self.head, (glob, local))  # (V·B, K)
        with torch.no_grad():
            teacher_out = self._embed(self.teacher["encoder"], self.teacher["head"], (glob,))  # (2·B, K)
        loss = dino_loss(student_out, teacher_out.detach(), self.center, student_temp=self.student_temp,
                         teacher_temp=self.current_teacher_temp(), num_global=2,
                         center_momentum=self.center_momentum, update_center=self.training, backend=self.backend)
        return {"loss": loss}
