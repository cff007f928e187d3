"""On-policy rollouts: the student, adapter active, samples responses with HF generate and its KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, P+R) left-padded prompts, then responses (pad after EOS)
    attention_mask: torch.Tensor  # (B, P+R) 1 on prompt tokens and on response tokens up to EOS
    response_mask: torch.Tensor  # (B, R) bool: generated tokens up to and including the first EOS
    prompt_len: int  # P

    @property
    def responses(self) -> torch.Tensor:  # (B, R)
        return self.input_ids[:, self.prompt_len:]

    @property
    def lengths(self) -> torch.Tensor:  # (B,)
        return self.response_mask.sum(1)

    def select(self, rows: slice | torch.Tensor) -> "Rollout":
        return Rollout(self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows], self.prompt_len)

    def position_ids(self) -> torch.Tensor:
        """Positions as generate saw them: counted from each row's first real token."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def eos_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def response_mask_from(responses: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """(B, R) bool: tokens up to and including the first EOS; everything when there is none.

    Found by position, not by `!= pad`, since pad and EOS are often the same id.
    """
    is_eos = torch.isin(responses, torch.tensor(eos, device=responses.device))  # (B, R)
    # tokens strictly after the first EOS have at least one EOS before them
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return ~after


@torch.no_grad()
def rollout(model: torch.nn.Module, tokenizer, prompts: list[list[int]], n: int = 1, temperature: float = 1.0,
            top_p: float = 1.0, max_new_tokens: int = 256) -> Rollout:
    """Sample `n` responses per prompt (rows are prompt-major: p0 r0, p0 r1, p1 r0, ...)."""
    was_training = model.training
    model.eval()  # no dropout, and gradient checkpointing (train-mode only) stays out of the KV-cache path
    device = next(model.parameters()).device
    rows = [p for p in prompts for _ in range(n)]
    batch = tokenizer.pad({"input_ids": rows}, padding=True, padding_side="left", return_tensors="pt")
    ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    eos = eos_ids(model, tokenizer)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 \
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, use_cache=True,
                         eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **sampling)
    model.train(was_training)
    P = ids.shape[1]
    responses = out[:, P:]
    if responses.shape[1] == 0:  # max_new_tokens reached 0 tokens: keep one column so shapes stay valid
        responses = torch.full((out.shape[0], 1), eos[0], dtype=out.dtype, device=out.device)
        out = torch.cat([out, responses], 1)
    rmask = response_mask_from(responses, eos)
    attention = torch.cat([attn, rmask.long()], 1)
    return Rollout(input_ids=out, attention_mask=attention, response_mask=rmask, prompt_len=P)
