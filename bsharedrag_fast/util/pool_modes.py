"""The one numbering of the pooling modes: enum bsr_pool_mode of the C ABI
(csrc/include/bsharedrag.h), which the C++ and Triton kernels take (ops.pool). Free of torch,
so the command line offers the names without loading it."""
POOL_MODES = {"last": 0, "mean": 1, "cls": 2}
MODES = tuple(POOL_MODES)
