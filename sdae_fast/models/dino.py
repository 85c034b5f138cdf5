"""DINO (Caron et al., ICCV 2021): self-distillation with no labels (SPEC §6, §7).

* The crops come from the data pipeline (``sdae_fast.data.dino_views``: torchvision v2 multi-crop
  with DINO's flip, colour jitter, grayscale, blur and solarisation); ``forward`` takes them as one
  tensor per resolution. ``global_size``, ``local_size`` and ``num_local`` say what it expects.
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

import torch
from torch import nn

from .. import ema_teacher
from ..ops.dino_loss import dino_loss
from ..schedules import linspace_at
from ..validate import check_int
from .dino_head import DINOHead
from .teacher import EmaTeacherMixin
from .vit import VisionTransformer, without_drop_path


class DINO(EmaTeacherMixin, nn.Module):
    OPS_USED = ("dino_loss",)

    def __init__(self, encoder: VisionTransformer, *, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm_last_layer: bool = True, use_bn_in_head: bool = False,
                 global_size: int | None = None, local_size: int | None = None, num_local: int = 8,
                 student_temp: float = 0.1, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float | None = 0.04, warmup_teacher_temp_epochs: int = 0,
                 center_momentum: float = 0.9, base_momentum: float = 0.996, final_momentum: float = 1.0,
                 backend: str | None = None):
        """Crop sizes default to the encoder's image size and 96/224 of it for local crops.
        The teacher temperature ramps linearly per epoch from ``warmup_teacher_temp`` (main_dino.py's
        default 0.04) to ``teacher_temp`` over ``warmup_teacher_temp_epochs`` (default 0: no ramp)."""
        super().__init__()
        self.encoder, self.backend = encoder, backend
        gsize = global_size or encoder.img_size
        lsize = local_size or max(encoder.patch_size, round(gsize * 96 / 224 / encoder.patch_size) * encoder.patch_size)
        for name, size in (("global_size", gsize), ("local_size", lsize)):  # a crop of at least one patch
            for side in size if isinstance(size, (tuple, list)) else (size,):
                check_int(f"DINO: {name}", side, ge=encoder.patch_size)
        self.global_size, self.local_size = gsize, lsize
        self.num_local = check_int("DINO: num_local", num_local, ge=0)
        self.head = DINOHead(encoder.embed_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer=norm_last_layer,
                             use_bn=use_bn_in_head)
        # main_dino.py builds the teacher ViT without drop_path_rate.
        self.teacher = nn.ModuleDict({"encoder": without_drop_path(encoder), "head": copy.deepcopy(self.head)})
        self.teacher_train_mode = use_bn_in_head
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.student_temp, self.teacher_temp, self.center_momentum = student_temp, teacher_temp, center_momentum
        self.warmup_teacher_temp, self.warmup_teacher_temp_epochs = warmup_teacher_temp, warmup_teacher_temp_epochs
        self._init_ema(base_momentum=base_momentum, final_momentum=final_momentum, per="iteration")

    @property
    def evaluated_encoder(self) -> nn.Module:
        """The backbone that evaluations and the export read: the teacher's, as DINO evaluates
        (eval_knn.py, eval_linear.py: ``--checkpoint_key teacher``)."""
        return self.teacher["encoder"]

    def current_teacher_temp(self) -> float:
        return self._teacher_temp_at(self.step // self.steps_per_epoch)

    def _teacher_temp_at(self, epoch: int) -> float:
        if self.warmup_teacher_temp is None or epoch >= self.warmup_teacher_temp_epochs:
            return self.teacher_temp
        return linspace_at(epoch, self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_epochs)

    def _teacher_temp_for_loss(self):
        """current_teacher_temp(); during a warm-up, under torch.compile or on a GPU, its entry of the
        per-epoch table as a 0-dim tensor: a float is a constant of a graph, one graph per warm-up
        epoch (main_dino.py's ViT-S/16 recipe warms up over 30), past Dynamo's recompile limit, and a
        CUDA-graph replay would repeat the captured epoch's. On a GPU the epoch is read off the
        EMA's device step counter, in eager steps too, so that a capture records the kernels those
        steps compiled (through Triton the loss is the float's, bit for bit)."""
        warmup = self.warmup_teacher_temp_epochs
        if self.warmup_teacher_temp is None or warmup <= 0:
            return self.teacher_temp
        if torch.compiler.is_compiling():  # the step a symbol (the EMA may not be built yet: a forward alone)
            return self._temperatures()[min(self.step // self.steps_per_epoch, warmup)]
        if self.center.is_cuda or ema_teacher.cuda_graph_capturing():
            epoch = self._ema_teacher().prepare()._count // self.steps_per_epoch
            return ema_teacher.entry(self._temperatures(), epoch.clamp(max=warmup))
        return self.current_teacher_temp()

    def _temperatures(self) -> torch.Tensor:
        """``_teacher_temp_at`` of every warm-up epoch and of the first past it (float64, on the
        device), kept once made outside a trace (a capture then finds it, made by the eager steps)."""
        table = getattr(self, "_temperature_table", None)
        if table is None or table.device != self.center.device:
            epochs = range(self.warmup_teacher_temp_epochs + 1)
            table = torch.tensor([self._teacher_temp_at(e) for e in epochs], dtype=torch.float64,
                                 device=self.center.device)
            if not torch.compiler.is_compiling():  # in a trace: a constant of the graph, not kept
                self._temperature_table = table
        return table

    @staticmethod
    def _embed(encoder, head, crops) -> torch.Tensor:
        # Crops of one resolution go through the encoder together (DINO's MultiCropWrapper).
        feats = torch.cat([encoder.embed(c) for c in crops if c is not None])
        return head(feats)

    def forward(self, crops) -> dict:
        """``crops``: [global crops (2·B, C, g, g), local crops (n·B, C, l, l)] (the local entry absent
        or None without local crops), view-major: row v·B + b is crop v of image b. Two entries even
        when l == g: the teacher reads the first entry alone (``collate_views`` keeps the roles apart)."""
        if isinstance(crops, torch.Tensor) or not 1 <= len(crops) <= 2:
            raise TypeError("DINO.forward takes [global crops, local crops] (one tensor per resolution, "
                            "from sdae_fast.data.dino_views + collate_views), not an image batch")
        glob, local = crops[0], (crops[1] if len(crops) > 1 else None)
        student_out = self._embed(self.encoder, self.head, (glob, local))  # (V·B, K)
        with torch.no_grad():
            teacher_out = self._embed(self.teacher["encoder"], self.teacher["head"], (glob,))  # (2·B, K)
        loss = dino_loss(student_out, teacher_out.detach(), self.center, student_temp=self.student_temp,
                         teacher_temp=self._teacher_temp_for_loss(), num_global=2,
                         center_momentum=self.center_momentum, update_center=self.training, backend=self.backend)
        return {"loss": loss}
