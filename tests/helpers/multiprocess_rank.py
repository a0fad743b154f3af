"""Rank classification in one process of a job (run by tests/test_multiprocess_tailpatch.py):
a tiny random decoder on a (data, model) mesh over every device of the job; writes the scores.

argv: OUTPUT.json plus flame.distributed's flags (local_job appends them).
"""
import argparse
import json

from flame import distributed

parser = argparse.ArgumentParser()
parser.add_argument("output")
distributed.add_flags(parser)
args = parser.parse_args()
distributed.initialize_from(args)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from flame import partitioning, rank_classification  # noqa: E402
from flame.autorater import autorater  # noqa: E402
from flame.models import decoder  # noqa: E402

model = decoder.DecoderOnlyModel(decoder.DecoderConfig(
    vocab_size=259, emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    mlp_dim=64))
host = jax.jit(lambda rng: model.init_params(rng, 2, {"inputs": 8, "targets": 8}),
               out_shardings=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
params = jax.tree_util.tree_map(np.asarray, host(jax.random.PRNGKey(0)))
partitioner = partitioning.Partitioner((-1, 2, 1))  # the model axis spans two devices
items = [(f"Question {i}: is {i} even?", ["yes", "no", "maybe not"], i % 2) for i in range(13)]
result = rank_classification.rank_classify(
    model, autorater.place_params(model, params, partitioner), items,
    {"inputs": 24, "targets": 12}, batch_size=8, partitioner=partitioner, progress=False)
if distributed.is_leader():
  with open(args.output, "w") as f:
    json.dump({"scores": [np.asarray(s, np.float64).tolist() for s in result.scores],
               "devices": jax.device_count(), "processes": jax.process_count()}, f)
