"""Shared test settings: everything runs on CPU, offline, with small Ray sessions."""

from ulrec.runtime_env import apply_defaults

# Tests also never start usage reporting and never see a GPU.
apply_defaults(extra={"WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0", "CUDA_VISIBLE_DEVICES": ""})


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower end-to-end test (still part of `make test`)")
