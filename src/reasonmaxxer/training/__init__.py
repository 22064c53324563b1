"""The trainers, their configs and what they write.

- :mod:`.configs`: :class:`~reasonmaxxer.ForkGatedConfig` and :class:`~reasonmaxxer.ForkGatedGRPOConfig`, TRL's configs with the gate and the loss as flat fields;
- :mod:`.trainer`: :class:`~reasonmaxxer.ForkGatedTrainer`, TRL's SFTTrainer with the fork-gated loss, on your own rollouts (offline); the CLI's training stage;
- :mod:`.dataset`: a user's rows (or the pipeline's selected rollouts) as the trainer's columns, and the collator;
- :mod:`.online`: :class:`~reasonmaxxer.ForkGatedGRPOTrainer`, the same loss inside TRL's GRPOTrainer, gated by the base's entropy (online);
- :mod:`.grpo`: the datasets and verifier rewards of the CLI's ``grpo`` and ``online`` methods;
- :mod:`.heldout_eval`: held-out pass@1 during training;
- :mod:`.model_card` and :mod:`.export`: the adapter's card and the merged model.
"""
