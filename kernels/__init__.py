"""hybridserve: kernels."""
