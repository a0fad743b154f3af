"""Models: the shared API (base), Llama-family decoder, T5 v1.1 encoder-decoder."""
