"""``shardtune plan``: what a run needs per GPU and per host, on paper, before any GPU is rented.

estimate.py does the arithmetic (the model built from its config.json on the meta device, the run's own memory
plan from policies/activation_budget.py); suggest.py finds the smallest change that fits; cli.py reads the flags
and prints one screen or JSON. docs/planning.md shows it on Llama-3.1-70B.
"""
