"""Evaluation of an adapter against its base: how far it moved, and whether it got better.

- :mod:`.movement`: per-position KL, JS, agreement and shift classes, and their summaries;
- :mod:`.accuracy`: pass@k, per-problem rewards, the paired bootstrap;
- :mod:`.runner`: the eval stage (:func:`run_eval`), sampling and teacher forcing, resumable;
- :mod:`.report`, :mod:`.plots`, :mod:`.forks_html`, :mod:`.ablation`: what a person reads.
"""
