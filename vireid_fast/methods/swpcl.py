"""SWPCL — soft-weight prototype contrastive learning (Zhao et al., Infrared Technology 47(5), 2025), **vireid_fast
interpretation**: only the abstract is public, so the method is ``shared/spec/methods/swpcl.md``'s smallest design
consistent with it, every open choice a config key.

The PCLHD pipeline (two stages, per-modality clustering, PGM matching and a parity-alternating cross term, an EMA
encoder evaluated in stage 2) with the hard and dynamic prototypes replaced by soft prototypes: per cluster the K
members nearest its centroid, weighted by their similarity to it (:class:`SoftPrototypeMemory`). Per modality
``L_mix = (1 - lam_e) CE_centroid + lam_e l_SW``: lam_e = 0 in stage 1 and ``sw_lambda * min(1, (e + 1) /
sw_ramp_epochs)`` in stage 2 (e = stage-2 epoch). Results are to be reported as "SWPCL (vireid_fast interpretation)".
"""

from __future__ import annotations

from dataclasses import dataclass

from ..memory import SoftPrototypeMemory
from ..modality import MODALITIES
from ..schema import spec
from .base import register_method
from .clustering import count_clusters
from .pclhd import PCLHD

__all__ = ["SWPCL"]


@register_method("swpcl")
class SWPCL(PCLHD):
    """Config keys: PCLHD's shared ones (stages, EMA, PGM, cross weight, DPCL and all-modality add-ons) plus the
    soft-prototype keys below (swpcl.md §6, §9)."""

    @dataclass
    class Params(PCLHD.Params):
        name: str = spec("swpcl", help="the registered method name (SWPCL, vireid_fast interpretation)")
        hpcl: bool = spec(False, help="PCLHD hard prototypes on top (not available for swpcl yet: keep false)")
        dpcl: bool = spec(False, help="add PCLHD's dynamic-prototype term (ablation row 4)")
        all_modality_branch: bool = spec(False, help="add PCLHD's all-modality step (I0)")
        ema: bool = spec(True, help="I9: momentum encoder from stage 2, evaluated then (off: evaluate phi_o)")
        sp: bool = spec(True, help="ablation: soft prototypes (off = centroid contrast only, row 0)")
        sp_k: int = spec(4, min=1, max=64, help="I10: soft prototypes per cluster K")
        sw_temp: float = spec(0.1, min=0.0, min_exclusive=True, help="I4: soft-weight temperature tau_w")
        sw_form: str = spec("softmax", choices=("softmax", "linear", "uniform"), help="I4: soft-weight formula")
        sw_min_sim: float = spec(-1.0, min=-1.0, max=1.0,
                                 help="I4: reliability floor delta (slots with s < delta dropped; -1 = off)")
        sw_lambda: float = spec(0.5, min=0.0, max=1.0, help="I5: lambda_max of the soft-prototype term")
        sw_ramp_epochs: int = spec(1, min=1, help="I5: stage-2 epochs to reach lambda_max (1 = a step)")
        sp_update: str = spec("momentum_topk", choices=("momentum_topk", "static"), help="I7: in-epoch refresh")
        cross_form: str = spec("mixed", choices=("mixed", "centroid"),
                               help="I6: cross term = L_mix on the other bank, or its centroid CE")
        cross_updates_bank: str = spec("all", choices=("all", "centroid_only", "none"),
                                       help="I6: what the cross call writes into the other modality's bank")

    def __init__(self, params, context):
        if params.hpcl:
            raise ValueError("method.hpcl: true is not available for swpcl in this version (swpcl.md §2.5 row 4 "
                             "needs the hybrid bank under the soft prototypes); set method.hpcl: false")
        super().__init__(params, context)
        p = params
        self.uses_ema = bool(p.ema or p.dpcl)
        dim = context.encoder.feature_dim
        soft = dict(num_prototypes=p.sp_k, temp=p.temp, momentum=p.memory_momentum, sw_temp=p.sw_temp,
                    sw_form=p.sw_form, min_sim=None if p.sw_min_sim <= -1.0 else p.sw_min_sim, sp_update=p.sp_update)
        self.soft_visible = SoftPrototypeMemory(dim, **soft)
        self.soft_infrared = SoftPrototypeMemory(dim, **soft)

    @property
    def ema_start(self) -> int:
        return self.params.stage1_epochs if (self.params.progressive or not self.params.dpcl) else 0

    @property
    def ema_active(self) -> bool:
        return self.uses_ema and (self.stage == 2 or self.dpcl_active)

    @property
    def sw_lambda_e(self) -> float:
        """lambda_e of the current epoch (swpcl.md §2.3); 0 without soft prototypes."""
        p = self.params
        if not p.sp:
            return 0.0
        if not p.progressive:
            return p.sw_lambda
        if self.stage == 1:
            return 0.0
        return p.sw_lambda * min(1.0, (self.stage2_epoch + 1) / p.sw_ramp_epochs)

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        self._epoch_info["sw_lambda"] = self.sw_lambda_e

    def build_intra_memories(self, features, labels):
        for m in MODALITIES:
            if count_clusters(labels[m]) == 0:
                continue  # no cluster: the engine skips training this epoch
            memory = getattr(self, f"soft_{m}")
            memory.build(features[m]["mean"], labels[m])
            for name in ("bank", "mask", "sims", "weights"):
                setattr(memory, name, getattr(memory, name).to(self.ctx.device))

    def intra_loss(self, feats, targets, modality):
        return getattr(self, f"soft_{modality}")(feats, targets, lam=self.sw_lambda_e, update="all")

    def cross_loss(self, f_vis, y_vis, f_ir, y_ir):
        p = self.params
        queries = self.matched_queries(f_vis, y_vis, f_ir, y_ir)
        if queries is None:
            return None
        feats, targets, target = queries
        lam = self.sw_lambda_e if p.cross_form == "mixed" else 0.0
        return getattr(self, f"soft_{target}")(feats, targets, lam=lam, update=p.cross_updates_bank)
