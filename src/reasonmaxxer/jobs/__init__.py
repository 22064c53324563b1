"""The jobs that compose the layers below: a run, a sweep, a compare.

- :mod:`.pipeline`: the stages of one run, their fingerprints, skip and resume;
- :mod:`.shared`: the stages a sweep's or a compare's points share, run once and linked;
- :mod:`.sweep`: W&B-format sweeps, locally or under ``wandb agent``;
- :mod:`.compare`: arms x seeds on one compute budget.
"""
