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


def prompt_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P - 1, V) logits that predict prompt tokens 2.., and their (B, P - 1) bool mask.

    Column j predicts the token at column j + 1; the columns before P - 1 predict prompt
    tokens (column P - 1 predicts the first completion token). A causal model's logits
    there depend on the prompt columns only, so this runs on the first P columns: its
    cost is the prompt's, not the whole sequence's. With left padding, column j predicts
    a real prompt token exactly when column j is itself a real token.
    """
    L = batch["input_ids"].shape[1]
    P = L - batch["completion_ids"].shape[1]
    mask = batch["attention_mask"][:, : max(P - 1, 0)].bool()
    if P < 2:  # one-token prompts: nothing predicts a prompt token
        vocab = model.get_output_embeddings().weight.shape[0]
        return torch.zeros((mask.shape[0], 0, vocab), device=mask.device), mask
    out = model(
        input_ids=batch["input_ids"][:, :P],
        attention_mask=batch["attention_mask"][:, :P],
        position_ids=batch["position_ids"][:, :P],
        logits_to_keep=torch.arange(0, P - 1, device=batch["input_ids"].device),
        use_cache=False,
    )
    return out.logits, mask
