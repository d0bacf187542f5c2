"""`python -m pretrain.plan +experiment=7b cluster.gpu=h100`: parameters, FLOPs, time and memory per GPU before
launching (pretrain/planning/plan.py)."""

from pretrain.planning.plan import main

if __name__ == "__main__":
    main()
