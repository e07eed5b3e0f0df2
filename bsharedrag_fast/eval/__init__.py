"""Evaluation: metrics by pytrec_eval, sacrebleu and rouge-score, and `bsharedrag eval`."""
