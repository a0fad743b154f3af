"""flame: T5X-style JAX/Flax post-training (FLAMe autoraters, model merging)."""
