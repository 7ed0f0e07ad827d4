"""The XLA options every device program compiles with (one place, so no program differs)."""

# Matmuls through cuBLAS, with the per-layer slice of the stacked weights fused into the call
# (XLA's dynamic-slice fusion). Without them, a lax.scan over the stacked layers copies each
# layer's weights out of the stack before its matmuls (the Triton GEMM fusions XLA picks for
# dots with few rows do not read a sliced operand in place): an extra write and read of every
# weight in every decode step and every reuse prefill. On an H100 at Llama-3-8B shapes that copy
# was 9.6 ms of naive reuse's 19.1 ms at 8K, and half of a decode step (19.4 -> 11.0 ms at batch
# 16 x 4K); docs/ttft.md and docs/throughput.md.
# No dot merging: XLA's dot-merger pass joins matmuls of one input by concatenating their weights
# first: with q, k and v as three weights, a 50 MB copy of Llama-3-8B weights in every layer of
# every decode step and sparse prefill (docs/ttft.md, round 4). The params hold q|k|v and gate|up
# as one matrix each since round 22 (models/llama.py), so nothing is left to merge but copies. The CPU backend ignores the GPU options; without its
# dot-merger, CPU programs compute the same dots, unmerged.
COMPILER_OPTIONS = {
    "xla_gpu_enable_triton_gemm": False,
    "xla_gpu_enable_dynamic_slice_fusion": True,
    "xla_disable_hlo_passes": "dot-merger",
}
