"""Evaluation: generate and grade over (task x method x sparsity), then report.

    results = rlkv.evaluate(model, tok, rlkv.EvalConfig(tasks=["gsm8k"], methods=["full", "rlkv"],
                            sparsities=[0.2, 0.5], heads="heads.json", limit=200), out="runs/q05")
    rlkv.eval.report("runs/q05")

Modules: `config` (what to run, checked), `plan` (the methods, byte-matched budgets), `run` (the
run loop), `samples` (a group's generations as sample records), `rundir` (the run directory on
disk), `summary` (aggregates), `report` (tables and plots).
"""

from rlkv.eval.config import EvalConfig
from rlkv.eval.report import report
from rlkv.eval.run import EvalResults, evaluate
from rlkv.eval.rundir import Shard

__all__ = ["EvalConfig", "EvalResults", "Shard", "evaluate", "report"]
