"""The offline recipe's stages, each a function of its inputs and settings.

- :mod:`.sampling` (prompts and the sampling engines) and :mod:`.rollouts` (the resumable writer);
- :mod:`.vllm_backend`: rollouts through vLLM;
- :mod:`.scoring`: the teacher-forced base pass (entropy, log-probs, cached top-k);
- :mod:`.selection`: mixed-success problems and their advantages;
- :mod:`.trainer`: :class:`~reasonmaxxer.stages.trainer.ForkGatedTrainer`, TRL's SFTTrainer with the fork-gated loss.
"""
