"""`python -m pretrain.generate runs/<name> 'prompt="def f("'`: sample from a run's newest checkpoint with
temperature, top-k, top-p and a KV cache (pretrain/evaluation/generate.py)."""

from pretrain.evaluation.generate import main

if __name__ == "__main__":
    main()
