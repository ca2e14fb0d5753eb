"""LongBench metrics, re-exported from lm-eval's own implementation.

The LongBench task YAMLs next to this file name ``process_results: !function
longbench_metrics.<fn>``; lm-eval resolves ``!function`` relative to the YAML's folder, so the
stock metrics are re-exported here rather than copied: scores match lm-eval's stock
``longbench_*`` tasks exactly.
"""

from lm_eval.tasks.longbench.metrics import get_qa_f1_with_score, get_rouge_with_score

__all__ = ["get_qa_f1_with_score", "get_rouge_with_score"]
