"""Autoregressive sampling: temperature, top-k, greedy, early stop at end-of-text.

    out = generate(model, idx, 40, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(0))
    text = generate_text(model, enc, "Every effort moves you", 40, temperature=0.8, top_k=40, seed=0)

No KV cache: every step runs the model over the (cropped) whole context.
"""

from __future__ import annotations

import torch

from lmcore.model import GPT


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend each row of idx by up to max_new_tokens sampled tokens.

    Args:
        model: the GPT; run in eval mode here and put back in its previous mode afterwards.
        idx: (B, T) prompt token ids on the model's device; only the last context_length are seen.
        temperature: divides the logits; 0 picks the argmax (greedy, no randomness).
        top_k: sample only among the k most likely tokens.
        eos_token: a row that produced it is finished; finished rows are padded with eos_token, and
            generation stops once every row has finished.
        generator: the random source for sampling (on the model's device), for reproducible samples.

    Returns: (B, T + n) with n <= max_new_tokens.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    was_training = model.training
    model.eval()
    context_length = model.config.context_length
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)  # (B,)
    try:
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -context_length:])  # (B, T', V)
            logits = logits[:, -1, :].float()  # (B, V): the next-token distribution only
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)  # (B, V)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            if eos_token is not None:
                next_token = next_token.masked_fill(done[:, None], eos_token)
                done |= next_token[:, 0] == eos_token
            idx = torch.cat([idx, next_token], dim=1)  # (B, T + 1)
            if eos_token is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)
    return idx


def generate_text(
    model: GPT,
    enc,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """Sample a completion of `prompt`, stopping at <|endoftext|>.

    Args:
        enc: a tiktoken Encoding (lmcore.tokenizer.get_encoding()).
        seed: seeds a torch.Generator, so the same model, prompt and seed give the same text.

    Returns: only the completion (without the prompt and without the end-of-text token).
    """
    device = next(model.parameters()).device
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token]  # empty prompt: start of a document
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(
        model, idx, max_new_tokens, temperature=temperature, top_k=top_k, eos_token=enc.eot_token, generator=generator
    )
    completion = out[0, idx.size(1) :].tolist()
    if enc.eot_token in completion:
        completion = completion[: completion.index(enc.eot_token)]
    # A model vocabulary padded beyond the tokenizer's has ids that decode to nothing: show them as U+FFFD.
    parts = [enc.decode_single_token_bytes(t) if t < enc.n_vocab else "\ufffd".encode() for t in completion]
    return b"".join(parts).decode("utf-8", errors="replace")
