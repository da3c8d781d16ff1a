"""Pure loss functions of the study: KD, DKD, logit standardisation, CKD, MCLD, DCD and CRD.

One module per family, re-exported here: ``baselines`` (KD, DKD, logit standardisation), ``ckd``, ``mcld``,
``dcd``, ``crd`` (the NCE loss) and ``crd_memory`` (its memory bank and negative sampler); ``_common`` holds
the dtype policy and argument checks they share.

Every function here is a pure function of its tensor arguments (``CRDMemory`` and the ``CRDNegativeSampler`` it
owns are the stateful modules, because CRD needs a memory bank and, for its negatives, the training labels).
The maths is the one written in ``shared/docs/methods.md`` (cited as "methods.md §N" below).

Conventions shared by every loss:

* **Precision.** Losses are computed in float32 whatever the input dtype: bf16/fp16 inputs are upcast with
  ``.float()``; float64 inputs stay float64 (so ``torch.autograd.gradcheck`` works). See ``_compute_dtype``.
* **Teacher is a constant.** Teacher logits are ``.detach()``-ed inside the logit losses, so no gradient ever
  reaches the teacher. (DCD is the exception: its teacher *embedding* comes out of a trainable head and is
  deliberately not detached; see :func:`dcd_loss`.)
* **Validation.** Bad arguments raise ``ValueError`` naming the argument and the valid values.
* **Multi-part losses** return a ``NamedTuple`` whose first field is ``total``; the other fields are the parts
  (weighted or not, as each docstring states) so that they can be logged.
* **Cost.** The contrastive logit losses (CKD, MCLD) cost O(B^2 * C) per batch and only ever see the batch:
  their cost does not depend on the size of the training set (unlike CRD, whose memory bank holds one entry
  per training sample).
"""

from .baselines import DKDLoss, dkd_loss, kd_loss, standardize_logits
from .ckd import CKD_ANCHORS, CKD_NEGATIVES, CKD_TERMS, CKDLoss, ckd_loss
from .crd import CRD_NEGATIVES, crd_loss, crd_nce_loss
from .crd_memory import CRDMemory, CRDNegativeSampler
from .dcd import DCDLoss, dcd_loss
from .mcld import (
    MCLD_NORMALIZE,
    MCLD_SAMPLE_MODES,
    MCLD_TARGET_MASKS,
    MCLDLoss,
    linear_warmup,
    mcld_category_loss,
    mcld_instance_loss,
    mcld_loss,
    mcld_sample_loss,
)

__all__ = [
    "DKDLoss",
    "CKDLoss",
    "MCLDLoss",
    "DCDLoss",
    "kd_loss",
    "dkd_loss",
    "standardize_logits",
    "ckd_loss",
    "mcld_instance_loss",
    "mcld_sample_loss",
    "mcld_category_loss",
    "mcld_loss",
    "linear_warmup",
    "dcd_loss",
    "CRDMemory",
    "CRDNegativeSampler",
    "crd_nce_loss",
    "crd_loss",
    "CRD_NEGATIVES",
    "CKD_ANCHORS",
    "CKD_NEGATIVES",
    "CKD_TERMS",
    "MCLD_NORMALIZE",
    "MCLD_TARGET_MASKS",
    "MCLD_SAMPLE_MODES",
]
