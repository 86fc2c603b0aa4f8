"""hybridserve: cluster."""
