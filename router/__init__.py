"""hybridserve: router."""
