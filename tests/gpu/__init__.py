"""Tests that need a CUDA device; each module starts with :func:`skip_module_without_cuda`."""


def skip_module_without_cuda(extension: bool = True) -> None:
    """Skip the calling test module unless a CUDA device is usable and, with ``extension``, ``moe_comm._C`` too."""
    import pytest
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device", allow_module_level=True)
    if extension:
        from moe_comm.backends.cuda import extension_status

        usable, reason = extension_status()
        if not usable:
            pytest.skip(f"cuda extension unusable: {reason}", allow_module_level=True)
