"""The one ``collate`` every stage batches tokenised rows with (padding never carries loss)."""

from __future__ import annotations

import torch

from selectmoe.data.template import IGNORE_INDEX


def count_labelled(labels) -> int:
    """Tokens that carry loss once labels are shifted (the first position never does)."""
    return sum(1 for x in list(labels)[1:] if x != IGNORE_INDEX)


def collate(rows: list[dict], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest row; padding never carries loss."""
    length = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.as_tensor(list(r["input_ids"]), dtype=torch.long)
        labels[i, :n] = torch.as_tensor(list(r["labels"]), dtype=torch.long)
        attention_mask[i, :n] = 1
    batch = {
        "input_ids": input_ids.to(device),
        "labels": labels.to(device),
        "attention_mask": attention_mask.to(device),
    }
    if "reference" in rows[0]:  # stage 1 with a reference set: which rows are trusted
        batch["reference"] = torch.tensor([bool(r["reference"]) for r in rows], device=device)
    return batch
