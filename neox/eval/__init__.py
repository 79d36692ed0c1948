"""Evaluation: lm-evaluation-harness over the launched model (lm.py) and perplexity on data (perplexity.py).

`deepy.py eval CONFIGS... --eval_tasks piqa arc_easy perplexity` starts `python -m neox.eval` on every rank.
"""
