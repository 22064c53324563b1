"""Forward passes that return only what predicts the completion tokens.

A packed batch (:func:`reasonmaxxer.utils.sequences.pack_batch`) left-pads prompts so
every completion starts at column P; column P + j - 1 predicts completion token j.
Shapes: B batch, L = P + C packed length, C completion positions, H hidden size,
V vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch


def _decoder_and_head(model: Any) -> tuple[Any, Any]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder, model.get_output_embeddings()


def completion_hidden(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, C, H) decoder states that predict each completion token (one decoder pass).

    Column P + j - 1 of a packed batch predicts completion token j.
    """
    decoder, _ = _decoder_and_head(model)
    hidden = decoder(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state
    C = batch["completion_ids"].shape[1]
    return hidden[:, hidden.shape[1] - C - 1 : -1]


def head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on a chunk of hidden states, with the model's final-logit softcap if any."""
    logits = model.get_output_embeddings()(hidden)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def completion_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, C, V): only the logits that predict completion tokens (columns P - 1 .. P + C - 2).

    Asking the model for exactly those columns (an index tensor as ``logits_to_keep``)
    avoids a slice of a larger logits tensor, whose backward would allocate it again.
    """
    L = batch["input_ids"].shape[1]
    C = batch["completion_ids"].shape[1]
    keep = torch.arange(L - C - 1, L - 1, device=batch["input_ids"].device)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=keep,
        use_cache=False,
    )
    return out.logits
