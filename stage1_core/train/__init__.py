"""Training and evaluation: `sft` (LoRA on a finished run's pairs), `evaluation` (base vs tuned:
metrics and the report), `judge` (pairwise, position-proof), `checkers` (IFEval instruction checks)
and `eval_data` (held-out prompts and references). The top of the library."""
