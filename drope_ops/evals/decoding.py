"""Greedy decoding with a KV cache: prefill the prompt once, then one forward step per new token.

    ids = greedy_generate(model, prompt_ids, max_new_tokens=32, eos_token_id=tok.eos_token_id)

The prefill keeps only the last position's logits (`logits_to_keep=1`): at 16k tokens and a 49k vocab
the full logits would be 3 GB of fp32 for nothing. No step ever re-runs the prefix.
"""

from __future__ import annotations

import torch


@torch.inference_mode()
def greedy_generate(
    model,
    prompt_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
) -> list[int]:
    """Greedy continuation of one prompt: (T,) or (1, T) ids -> list of up to max_new_tokens new ids.

    Stops early at any id of `eos_token_id`. Forward calls: exactly 1 prefill + (n_new - 1) steps.
    """
    device = next(model.parameters()).device
    ids = prompt_ids.view(1, -1).to(device)  # (1, T)
    stop = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # the model makes its DynamicCache
    generated: list[int] = []
    position = ids.shape[1]
    while True:
        next_id = int(out.logits[0, -1].argmax())
        generated.append(next_id)
        if next_id in stop or len(generated) >= max_new_tokens:
            return generated
        step = torch.tensor([[next_id]], device=ids.device)  # (1, 1)
        out = model(
            input_ids=step,
            past_key_values=out.past_key_values,
            use_cache=True,
            position_ids=torch.tensor([[position]], device=ids.device),
            logits_to_keep=1,
        )
        position += 1
