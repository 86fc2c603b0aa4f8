"""Plain-torch references of the hot ops. Each Triton kernel (kernels/triton/) must match these."""
