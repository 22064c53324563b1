"""The offline recipe's data stages, each a function of its inputs and settings.

- :mod:`.sampling` (prompts and the sampling engines) and :mod:`.rollouts` (the resumable writer);
- :mod:`.vllm_backend`: rollouts through vLLM;
- :mod:`.scoring`: the teacher-forced base pass (entropy, log-probs, cached top-k);
- :mod:`.selection`: mixed-success problems and their advantages.

The trainers that consume them are in :mod:`reasonmaxxer.training`; the jobs that chain
them in :mod:`reasonmaxxer.jobs`.
"""
