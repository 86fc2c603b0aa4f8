"""hybridserve: model_shards."""
