"""Published CIFAR-100 numbers the study's tables sit beside (methods.md §5)."""

from __future__ import annotations

# methods.md §5: published CIFAR-100 top-1 (%), 240-epoch benchmark. Keys: "teacher", "ce" (the student alone)
# and method names. CKD and MCLD publish no numbers we can cite (methods.md §5).
PUBLISHED: dict[tuple[str, str], dict[str, float]] = {
    ("wrn_40_2", "wrn_16_2"): dict(teacher=75.61, ce=73.26, kd=74.92, crd=75.48, dkd=76.24, kd_ls=76.11,
                                   dcd=74.99, dcd_kd=76.06),
    ("wrn_40_2", "wrn_40_1"): dict(teacher=75.61, ce=71.98, kd=73.54, crd=74.14, dkd=74.81, kd_ls=74.37,
                                   dcd=73.69, dcd_kd=74.76),
    ("resnet56", "resnet20"): dict(teacher=72.34, ce=69.06, kd=70.66, crd=71.16, dkd=71.97, kd_ls=71.43,
                                   dcd=71.18, dcd_kd=71.81),
    ("resnet110", "resnet32"): dict(teacher=74.31, ce=71.14, kd=73.08, crd=73.48, dkd=74.11, kd_ls=74.17,
                                    dcd=73.12, dcd_kd=73.62),
    ("resnet32x4", "resnet8x4"): dict(teacher=79.42, ce=72.50, kd=73.33, crd=75.51, dkd=76.32, kd_ls=76.62,
                                      dcd=74.23, dcd_kd=75.09),
    ("vgg13", "vgg8"): dict(teacher=74.64, ce=70.36, kd=72.98, crd=73.94, dkd=74.68, kd_ls=74.36, dcd=73.22,
                            dcd_kd=73.95),
    ("vgg13", "MobileNetV2"): dict(teacher=74.64, ce=64.60, kd=67.37, crd=69.73, dkd=69.71, kd_ls=68.61,
                                   dcd=68.35, dcd_kd=69.77),
    ("ResNet50", "MobileNetV2"): dict(teacher=79.34, ce=64.60, kd=67.35, crd=69.11, dkd=70.35, kd_ls=69.02,
                                      dcd=67.39, dcd_kd=70.03),
    ("resnet32x4", "ShuffleV1"): dict(teacher=79.42, ce=70.50, kd=74.07, crd=75.11, dkd=76.45, dcd=74.26,
                                      dcd_kd=76.01),
    ("resnet32x4", "ShuffleV2"): dict(teacher=79.42, ce=71.82, kd=74.45, crd=75.65, dkd=77.07, kd_ls=75.56,
                                      dcd=75.26, dcd_kd=76.95),
    ("wrn_40_2", "ShuffleV1"): dict(teacher=75.61, ce=70.50, kd=74.83, crd=76.05, dkd=76.70, dcd=74.98,
                                    dcd_kd=76.51),
}


def published_teacher_top1(model: str) -> float | None:
    """The published top-1 (%) of the standard CIFAR-100 teacher checkpoint ``model`` (methods.md §5), if any."""
    return next((row["teacher"] for (teacher, _), row in PUBLISHED.items() if teacher == model), None)
