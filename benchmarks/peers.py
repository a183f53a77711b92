"""Reference implementations for parity tests and speed ratios: around an lmcore model, or from a GGUF file alone.

    tok = gpt2_tokenizer("../shared/tokenizers/gpt2.tiktoken")   # a transformers fast tokenizer, built offline
    lm = lmeval_hflm(model, tok, batch_size=16)                   # lm-evaluation-harness's own HF backend
    hf, tok = hf_from_gguf("../shared/data/models/SmolLM2-135M-Instruct.Q4_1.gguf")  # transformers' GGUF loader
    lm = hflm(hf, tok, batch_size=16)                             # HFLM on any transformers model in memory
    hf = hf_causal_lm(model, hf_token_ids(enc))                   # GPT-2 or Llama weights, the tokenizer's special ids
    tok = hf_tokenizer(enc, folder)                               # an lmcore tokenizer as AutoTokenizer loads it

The lmcore weights are exported to a `transformers` GPT2LMHeadModel or LlamaForCausalLM (lmcore.hf), so lm-eval scores
them with its own tokenisation, batching and truncation code: nothing of ours runs on the peer side but the weight
mapping and the tokenizer files (lmcore.hf.write_hf_tokenizer, as `lmcore export-hf` writes them).
A GGUF file is read by transformers and gguf alone: nothing of ours runs on that peer side at all.
"""

from __future__ import annotations

import os
from pathlib import Path

from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PATTERN

from lmcore.hf import to_hf, to_hf_gpt2, write_hf_tokenizer
from lmcore.model import GPT
from lmcore.tokenizer import Tokenizer


def gpt2_tokenizer(ranks_file: str | os.PathLike):
    """A transformers fast tokenizer equal to tiktoken's gpt2, built from a local ranks file (no hub)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=str(ranks_file), pattern=GPT2_PATTERN, extra_special_tokens={"<|endoftext|>": 50256})
    return PreTrainedTokenizerFast(
        tokenizer_object=converter.converted(), eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def hf_model(model: GPT):
    """The same weights as a transformers GPT2LMHeadModel in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config, state = to_hf_gpt2(model)
    hf = GPT2LMHeadModel(GPT2Config(**config))
    hf.load_state_dict(state, strict=False)  # strict=False: tied lm_head.weight and non-persistent buffers
    return hf.to(next(model.parameters()).device).eval()


def hf_token_ids(tok: Tokenizer) -> dict[str, int]:
    """The tokenizer's bos id (if it has one) and eos id (its eos, else its end of text) as transformers config keys.

    lmcore.hf.to_hf knows GPT-2's <|endoftext|> only; transformers' `generate` stops at the config's eos, as the
    original model's generation config makes it stop (SmolLM2: <|im_end|>).
    """
    eos = getattr(tok, "eos_token", None)
    ids = {"bos_token_id": tok.bos_token, "eos_token_id": tok.eot_token if eos is None else eos}
    return {k: v for k, v in ids.items() if v is not None}


def hf_causal_lm(model: GPT, token_ids: dict[str, int] | None = None):
    """The same weights as a transformers GPT2LMHeadModel or LlamaForCausalLM (lmcore.hf.to_hf), in eval mode.

    Args:
        token_ids: config keys (bos_token_id, eos_token_id, pad_token_id) over to_hf's: `hf_token_ids(tokenizer)`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config, state = to_hf(model)
    config.update(token_ids or {})
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    missing, unexpected = hf.load_state_dict(state, strict=False)  # a tied lm_head.weight is re-tied, not loaded
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not match transformers' model: missing {missing}, unexpected {unexpected}")
    return hf.to(next(model.parameters()).device).eval()


def hf_tokenizer(tok: Tokenizer, folder: str | os.PathLike):
    """An lmcore tokenizer as transformers' AutoTokenizer loads it (its chat template included), through the files
    lmcore.hf.write_hf_tokenizer writes into `folder` (an existing, empty folder)."""
    from transformers import AutoTokenizer

    write_hf_tokenizer(tok, Path(folder))
    return AutoTokenizer.from_pretrained(folder)


def hf_from_gguf(path: str | os.PathLike):
    """transformers' own GGUF loading of `path`: (the model dequantized to float32, in eval mode; its tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def hflm(model, tokenizer, batch_size: int = 16, max_length: int | None = None):
    """lm-evaluation-harness's HFLM around a transformers model in memory.

    Args:
        max_length: the longest input; None: what HFLM reads from the model's config.
    """
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def lmeval_hflm(model: GPT, tokenizer, batch_size: int = 16):
    """lm-evaluation-harness's HFLM around the exported model."""
    return hflm(hf_model(model), tokenizer, batch_size=batch_size, max_length=model.config.context_length)
