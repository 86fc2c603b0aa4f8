"""Training recipe for the shipped default model (checkpoints/hybrid-mini): corpus, tokenizer, training, evaluation."""
