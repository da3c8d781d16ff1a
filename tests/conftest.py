"""Shared fixtures: the real CIFAR-100 root (skipped with a reason when absent), the CPU reproduction's frozen
plan, and quiet CPU threads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def cifar100_root() -> Path | None:
    """Where the real CIFAR-100 lives: $CKD_DATA_DIR, else ../shared/datasets beside the repo, else data/."""
    candidates = [os.environ.get("CKD_DATA_DIR"), REPO.parent / "shared" / "datasets", REPO / "data"]
    for c in candidates:
        if c and ((Path(c) / "cifar100").is_dir() or (Path(c) / "cifar-100-python").is_dir()):
            return Path(c)
    return None


@pytest.fixture(scope="session")
def reproduction_plan() -> dict:
    """The committed plan of the CPU reproduction (paper recipe, resnet56 -> resnet20, seed 0): the run ids and
    resolved configs it froze when it first started; ``medium`` reuses its teacher."""
    from ckd_study.campaign import campaign_name

    name = campaign_name("paper", ("resnet56", "resnet20"), seed=0)
    return json.loads((REPO / "results" / "campaigns" / name / "plan.json").read_text())


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    root = cifar100_root()
    if root is None:
        pytest.skip("real CIFAR-100 not found: set CKD_DATA_DIR to a folder holding cifar100/ "
                    "(npz shards) or cifar-100-python/, e.g. CKD_DATA_DIR=../shared/datasets")
    return root
