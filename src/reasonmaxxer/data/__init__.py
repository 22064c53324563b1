"""Problems with checkable answers and the verifier that rewards rollouts.

- :mod:`.problem`: the :class:`Problem` record, the held-out split, a run's problems file;
- :mod:`.builtin`: the built-in arithmetic generator (the embedded default task);
- :mod:`.loaders`: Hugging Face datasets and local JSONL/JSON/parquet files;
- :mod:`.sources`: the train and held-out problems of a run's ``data`` section;
- :mod:`.rewards`: answer extraction and verification (reward 1 or 0).
"""
