"""From a partial checkpoint to the optimised model in one command: patch every task, analyse,
train the optimised run (FLAMe-Opt-RM).

    python -m flame.tailpatch.optimize --gin_file=models/decoder_tiny.gin \\
      --gin_file=flame/flame.gin --init=/tmp/flame/checkpoints/2000 \\
      --initial=/tmp/init --out_dir=/tmp/tailpatch [--optimised_steps=5000] \\
      [--vanilla=/tmp/flame/checkpoints/30000]

Your gin files describe the vanilla run. Phase 1 runs them plus ``tailpatch/tailpatch.gin``
(`flame.tailpatch.run --all`); phase 2 is `flame.tailpatch.analyze`; phase 3 trains
``OUT/optimised`` with your files plus ``--optimised_recipe`` (default
``tailpatch/optimised.gin``: the same model, optimizer, batch and lengths, from
``--initial`` on ``OUT/analysis/weights.tsv``); then the analysis is written again with the
compute accounting of the optimised run (and of ``--vanilla``, when given). ``--gin.NAME=V``
bindings apply to every phase; ``--patch_binding='NAME = V'`` (repeatable) to the patch grid and
the analysis only, after them: e.g. patches at a constant learning rate a tenth of the
vanilla run's (``LEARNING_RATE = 1e-4``, the envelope's recommendation in docs/tailpatch.md) or
``Rules.score = "accuracy"`` (FLAMe's score; the default is "debiased");
``--optimised_binding='NAME = V'`` (repeatable) to the optimised run only, after them: e.g.
its learning-rate schedule over its own length when the vanilla run's decays over another
(``optimizers.learning_rate_schedule.total_steps = 5000``). The optimised run's configuration
is parsed (names and syntax) before the grid, so a wrong binding fails in seconds, not after
hours of patches. Each phase resumes or skips finished work, so a killed command rerun finishes
the job.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

if __name__ == "__main__":
  from flame.tailpatch import optimize as _importable
  sys.exit(_importable.main())

import gin

from flame import cli, gin_utils, train
from flame.checkpoints import convert, manager
from flame.tailpatch import analyze, run


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="flame-tailpatch-optimize",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--init", required=True, help="the partial vanilla checkpoint to patch")
  p.add_argument("--initial", required=True,
                 help="the checkpoint the vanilla run started from (the optimised run's start)")
  p.add_argument("--out_dir", required=True)
  p.add_argument("--optimised_recipe", default="tailpatch/optimised.gin")
  p.add_argument("--optimised_steps", type=int, default=None,
                 help="the optimised run's TRAIN_STEPS (default: your gin's)")
  p.add_argument("--vanilla", help="the vanilla run's final checkpoint, for compute accounting")
  p.add_argument("--optimised_binding", action="append", default=[],
                 help="a gin binding for the optimised run only (after the --gin.* ones), e.g. "
                 "'optimizers.learning_rate_schedule.total_steps = 5000'; repeatable")
  p.add_argument("--patch_binding", action="append", default=[],
                 help="a gin binding for the patch grid and its analysis only (after the "
                 "--gin.* ones), e.g. a constant learning rate below the vanilla run's: "
                 "'LEARNING_RATE = 1e-4', or 'Rules.score = \"accuracy\"'; repeatable")
  p.add_argument("--debug", action="store_true")
  return p


def check_flags(args) -> None:
  """The flags the last phases use, checked before the patch grid (hours on a pod) runs."""
  if args.optimised_steps is not None and args.optimised_steps < 1:
    raise cli.UsageError(f"--optimised_steps={args.optimised_steps}: the optimised run needs "
                         "at least 1 step")
  for flag in ("initial", "vanilla"):
    path = getattr(args, flag)
    if path is None:
      continue
    try:
      convert.checkpoint_step(path)
    except manager.CheckpointError as e:
      raise cli.UsageError(f"--{flag}={path}: not a checkpoint ({e})") from e


def configure_optimised(gin_files: Sequence[str], bindings: Sequence[str], args,
                        finalize: bool = True) -> str:
  """Parses the optimised run's gin (your files + --optimised_recipe; your bindings, its
  checkpoint, weights file and steps, then --optimised_binding); returns its MODEL_DIR.
  `finalize=False` checks names and syntax only (a macro left required is the run's error)."""
  weights = os.path.join(args.out_dir, "analysis", "weights.tsv")
  model_dir = os.path.join(args.out_dir, "optimised")
  extra = [f"INITIAL_CHECKPOINT = {os.path.abspath(args.initial)!r}",
           f"WEIGHTS_FILE = {os.path.abspath(weights)!r}", f"MODEL_DIR = {model_dir!r}"]
  if args.optimised_steps is not None:
    extra.append(f"TRAIN_STEPS = {args.optimised_steps}")
  gin.clear_config()
  try:
    gin_utils.parse(list(gin_files) + [args.optimised_recipe],
                    list(bindings) + extra + list(args.optimised_binding), finalize)
  except (ValueError, SyntaxError) as e:
    raise cli.UsageError(f"the optimised run's gin (--optimised_recipe={args.optimised_recipe}, "
                         f"--optimised_binding={args.optimised_binding}): {e}") from e
  return model_dir


def optimize(gin_files: Sequence[str], bindings: Sequence[str], args) -> tuple:
  """Runs the three phases; returns (analysis, accounting)."""
  if not gin_files:
    raise cli.UsageError("give the vanilla run's --gin_file(s)")
  check_flags(args)
  configure_optimised(gin_files, bindings, args, finalize=False)  # fails before the grid
  gin.clear_config()
  settings = run.configure(gin_files, list(bindings) + list(args.patch_binding))
  run.run(settings, run.build_parser().parse_args(
      [f"--init={args.init}", f"--out_dir={args.out_dir}", "--all"]))
  rules = analyze.Rules()  # the grid's gin: --patch_binding may set the rules
  analyze.run(args.out_dir, rules)
  model_dir = configure_optimised(gin_files, bindings, args)
  logging.info("optimised run: %s", model_dir)
  train.train()  # pylint: disable=no-value-for-parameter
  return analyze.run(args.out_dir, rules, args.vanilla, model_dir)


def main(argv: Optional[Sequence[str]] = None) -> int:
  cli.setup_logging()
  gin_files, bindings, rest = gin_utils.split_flags(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(rest)
  return cli.run("flame-tailpatch-optimize", lambda: optimize(gin_files, bindings, args),
                 lambda r: analyze.summary_markdown(*r) + "\noptimised model: "
                 + os.path.join(args.out_dir, "optimised"), args.debug)


def console_main() -> None:
  sys.exit(main())
