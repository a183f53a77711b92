"""Reference implementations wrapped around an lmcore model, for parity tests and speed ratios.

    tok = gpt2_tokenizer("../shared/tokenizers/gpt2.tiktoken")   # a transformers fast tokenizer, built offline
    lm = lmeval_hflm(model, tok, batch_size=16)                   # lm-evaluation-harness's own HF backend

The lmcore weights are exported to a `transformers` GPT2LMHeadModel (lmcore.hf), so lm-eval scores them with its
own tokenisation, batching and truncation code: nothing of ours runs on the peer side but the weight mapping.
"""

from __future__ import annotations

import os

from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PATTERN

from lmcore.hf import to_hf_gpt2
from lmcore.model import GPT


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


def lmeval_hflm(model: GPT, tokenizer, batch_size: int = 16):
    """lm-evaluation-harness's HFLM around the exported model."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=hf_model(model), tokenizer=tokenizer, batch_size=batch_size, max_length=model.config.context_length)
