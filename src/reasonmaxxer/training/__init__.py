"""The trainers and what they write.

- :mod:`.trainer`: :class:`~reasonmaxxer.training.trainer.ForkGatedTrainer`, TRL's SFTTrainer with the fork-gated loss (offline);
- :mod:`.online`: the same loss inside TRL's GRPOTrainer, gated by the base's entropy (online);
- :mod:`.grpo`: the datasets and verifier rewards of the ``grpo`` and ``online`` methods;
- :mod:`.heldout_eval`: held-out pass@1 during training;
- :mod:`.model_card` and :mod:`.export`: the adapter's card and the merged model.
"""
