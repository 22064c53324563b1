"""Plumbing every layer uses: atomic files and JSONL (:mod:`.storage`), processes (:mod:`.distributed`),
batch packing (:mod:`.sequences`)."""
