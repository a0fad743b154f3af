"""One process of a 2-process CPU "pod" (run by tests/test_multihost.py).

argv: process_id, coordinator port, model_dir, output json path.
"""
import json
import os
import sys

process_id, port, model_dir, output = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=process_id)

import numpy as np  # noqa: E402

from flame import inputs, optimizers, partitioning, train  # noqa: E402
from flame.data import quickstart_tasks  # noqa: E402,F401
from flame.models import decoder  # noqa: E402

LENGTHS = {"inputs": 48, "targets": 4}
model = decoder.DecoderOnlyModel(decoder.DecoderConfig())
# Long enough to get past the shared instruction text into each example's question.
first_batch = next(inputs.get_batches("truthfulqa_judge_bytes", {"inputs": 256, "targets": 4},
                                      model.feature_converter(), 8, seed=0))
state, metrics = train.train(
    model_dir=model_dir, model=model, mixture_or_task_name="truthfulqa_judge_bytes",
    task_feature_lengths=LENGTHS, train_steps=6, batch_size=8,
    learning_rate_fn=optimizers.learning_rate_schedule(3e-3),
    partitioner=partitioning.Partitioner((-1, 1, 1)), checkpoint_every=3, progress_bar=False)
with open(output, "w") as f:
  json.dump({"devices": jax.device_count(), "local_devices": jax.local_device_count(),
             "loss": metrics["loss"], "step": int(state["step"]),
             "first_rows": np.asarray(first_batch["decoder_target_tokens"]).tolist()}, f)
jax.distributed.shutdown()
