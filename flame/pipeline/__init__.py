"""flame-pipeline: data → vanilla autorater → tail-patch → FLAMe-Opt → experts → merges →
evaluation → report (`flame.pipeline.pipeline`). The top floor: nothing else imports it."""
