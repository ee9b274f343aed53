"""MiCA: Minor Component Adaptation (arXiv 2604.01694).

Take the SVD of the frozen weight in fp32, ``W = U S V^T`` (singular values descending); set
``B = U[:, -r:]``, the left singular vectors of the ``r`` *smallest* singular values, and freeze
it; ``A = 0`` trains. The update ``s * B A`` therefore only writes into the minor output subspace
of ``W``, which pretraining used least, and starts at zero. Forward, merge and export are LoRA's.

``B`` is a persistent buffer of the adapter, so ``save_adapters``, Lightning checkpoints and
``export_peft`` (written with ``init_lora_weights="mica"``, which PEFT 0.21 implements the same
way) all carry it; nothing depends on re-running the SVD. The SVD runs once, at ``inject`` time,
on the weights the model has then: load pretrained weights before injecting. With ``qkv`` each of
q/k/v gets the minor vectors of its own slice; on Embedding the weight is viewed as ``(dim, num)``
as PEFT does; on Conv2d as ``(out, in*kh*kw)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .lora import LoRA


@dataclass
class MiCA(LoRA):
    """LoRA whose frozen ``B`` spans the minor left singular subspace of ``W``; only ``A`` trains.

    Same fields as :class:`LoRA` except ``dora`` (MiCA has no magnitude vector).
    """

    method: ClassVar[str] = "mica"
    init_scheme: ClassVar[str] = "mica"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dora:
            raise ValueError("MiCA.dora must be False: MiCA has no DoRA variant")
