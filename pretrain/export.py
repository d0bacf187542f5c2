"""`python -m pretrain.export runs/<name> out=exports/<name>`: the newest checkpoint as a Hugging Face Llama
directory (pretrain/evaluation/export.py)."""

from pretrain.evaluation.export import main

if __name__ == "__main__":
    main()
