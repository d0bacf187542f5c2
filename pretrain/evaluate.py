"""`python -m pretrain.evaluate runs/<name>`: held-out perplexity of a run's newest checkpoint, overall and per
source, or the long-context suite (pretrain/evaluation/evaluate.py)."""

from pretrain.evaluation.evaluate import main

if __name__ == "__main__":
    main()
