"""Networks, the model bundle, inference, training on phantoms, evaluation metrics."""
