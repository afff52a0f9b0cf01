"""Independent references of dsv3's math, for the tests and the benchmarks (never imported by
the runtime path of ``import dsv3``).

Everything here is written from the formulas of docs/semantics.md, not from the C++:

- ``nn``: RoPE/YaRN frequencies, RMSNorm, the MLA and MHA/GQA layers (numpy + PyTorch
  float64 autograd).
- ``moe``: the DeepSeekMoE gate, a dense every-expert-on-every-token layer and the
  sequence-wise balance loss.
- ``fp8``: the FP8/BF16 formats, block quantization and the block-scaled GEMM, including the
  limited-precision accumulator, on exact integers and float64.
- ``lowp``: bf16 rounding and the bf16 GEMM (with the error bound's scale), in float64.
- ``model``: the whole model (blocks, MTP, losses) in float64 PyTorch.
- ``torch_model`` / ``torch_moe``: the model and the MoE layer in ordinary float32 PyTorch eager
  code: the benchmarks' peer and a second implementation the tests compare against.

The PyTorch parts need ``torch`` (a test/benchmark dependency, not a dependency of dsv3).
"""
