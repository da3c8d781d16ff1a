"""ckd-study: a reproducible study of contrastive knowledge distillation on CIFAR-100.

Subpackages and modules:

- :mod:`ckd_study.data`     datasets (CIFAR-100/10 and sklearn digits), on-device augmentation, batch iterator
- :mod:`ckd_study.models`   the CIFAR teacher/student model zoo, one typed output for every model
- :mod:`ckd_study.losses`   pure loss functions (KD, DKD, LS, CKD, MCLD, DCD, CRD)
- :mod:`ckd_study.methods`  registered distillation methods that own their extra modules
- :mod:`ckd_study.config`   typed run configs and presets (smoke / quick / paper)
- :mod:`ckd_study.train`    the one training loop
- :mod:`ckd_study.runs`     the results store: run(), resume, load_results()
"""

__version__ = "0.1.0"
