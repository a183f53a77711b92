"""SmolLM2 fine-tuned by the pipeline, exported to GGUF by lmcore, run in llama.cpp (llama-cpp-python): the same greedy
tokens as lmcore for f32, the same first tokens for f16, and the GGUF's chat template gives lmcore's chat reply.

The fine-tuned model: the mirror's SmolLM2-135M-Instruct imported (lmcore.gguf.import_gguf), then two steps of LoRA
instruction tuning on a handful of examples through the stage's own function (finetune_instruct: adapters trained,
merged into the weights and saved), so the exported weights are the pipeline's, not the download's.

The last test runs `benchmarks.decode_speed --gguf` on it for a few tokens.

    python -m pytest -m slow tests/test_llama_cpp.py -q

llama-cpp-python has no wheel for every machine; pip builds it from its source distribution (about 9 minutes on 2
cores; `pip install -e '.[llama]'`, as .ci/run does). Without it the tests skip, naming why, except under CI (env CI
set), where they fail.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lmcore.chat import prompt_ids, stop_tokens
from lmcore.checkpoint import load_model
from lmcore.config import InstructConfig, LoraConfig
from lmcore.finetune.instruct import finetune_instruct
from lmcore.generation import generate, stream_text
from lmcore.paths import ADAPTER, WEIGHTS
from lmcore.tokenizer import load_tokenizer

pytest.importorskip("gguf")
from lmcore.gguf import export_gguf, import_gguf  # noqa: E402

pytestmark = pytest.mark.slow

SMOLLM2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "The capital of France is",
    "def fib(n):\n    return",
    "In 2024, 1234567 people paid $89.99 for",
    "Once upon a time, in a small village,",
]
N_TOKENS = 24  # greedy tokens per prompt, f32: all equal
# f16 weights against lmcore's float32 ones (ggml also rounds the activations to f16 in its f16 matmuls): only the
# first tokens are compared. Seen: all of the first 48 equal on these four prompts.
F16_TOKENS = 16
EXAMPLES = [
    {"instruction": "Name the capital of France.", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5."},
    {"instruction": "Give the opposite of the word.", "input": "hot", "output": "Cold."},
    {"instruction": "Say hello in Spanish.", "input": "", "output": "Hola."},
]
LORA_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc_1", "mlp.fc_2", "mlp.proj"]  # params.yaml's, for SmolLM2
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def llama_cpp():
    """The llama_cpp module; skipped when it is not installed, failed under CI (env CI set: .ci/run installs it)."""
    try:
        import llama_cpp
    except ImportError:
        why = "llama-cpp-python is not installed: pip install -e '.[llama]' builds it from source (see .ci/run)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must install it", pytrace=False)
        pytest.skip(why)
    return llama_cpp


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, llama_cpp) -> Path:
    """The pipeline's fine-tuned SmolLM2: imported, two LoRA instruct steps, adapters merged, saved with its
    tokenizer."""
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} is not there")
    root = tmp_path_factory.mktemp("llama-cpp")
    import_gguf(SMOLLM2, root / "base")
    splits = root / "splits"
    splits.mkdir()
    for split, rows in (("train", EXAMPLES[:2]), ("val", EXAMPLES[2:3]), ("test", EXAMPLES[3:])):
        (splits / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    # One example per step, bf16 autocast: seconds on two cores (fp32 batches of two took a minute)
    cfg = InstructConfig(max_steps=2, batch_size=1, lr=2e-3, eval_interval=2, eval_batches=1, max_length=64,
                         precision="bf16", max_test_generations=0,
                         lora=LoraConfig(enabled=True, rank=4, alpha=8, target_modules=LORA_TARGETS))
    summary = finetune_instruct(cfg, root / "base", splits, root / "model", root / "reports", seed=0,
                                enc=load_tokenizer(root / "base"))
    assert summary["lora"] and summary["steps"] == 2 and summary["template"] == "chat"
    assert (root / "model" / ADAPTER).is_file()
    name = "blocks.0.attn.qkv.weight"
    with safe_open(root / "base" / WEIGHTS, "pt") as base, safe_open(root / "model" / WEIGHTS, "pt") as tuned:
        assert not torch.equal(base.get_tensor(name), tuned.get_tensor(name))  # the merged adapters moved it
    return root / "model"


@pytest.fixture(scope="module")
def ours(finetuned):
    return load_model(finetuned), load_tokenizer(finetuned)


@pytest.fixture(scope="module")
def exported(finetuned) -> dict[str, Path]:
    """The fine-tuned model as GGUF files, f32 and f16."""
    out = {}
    for dtype in ("f32", "f16"):
        out[dtype] = finetuned.parent / f"smollm2-ft.{dtype}.gguf"
        summary = export_gguf(finetuned, out[dtype], dtype=dtype)
        assert summary["tensor_types"] == ({"F32": 272} if dtype == "f32" else {"F16": 211, "F32": 61})
    return out


def _llama(llama_cpp, path: Path):
    # torch's thread count: one under pytest-xdist, where each worker has a core (llama.cpp's threads spin-wait, and
    # two of them on a shared core run several times slower)
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)


def _greedy(llm, ids: list[int], n: int) -> list[int]:
    tokens = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        tokens.append(t)
        if len(tokens) == n:
            return tokens
    return tokens


def _ours_greedy(model, ids: list[int], n: int) -> list[int]:
    return generate(model, torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist()


def test_f32_greedy_tokens_equal_lmcore(llama_cpp, exported, ours):
    model, tok = ours
    llm = _llama(llama_cpp, exported["f32"])
    assert llm.n_vocab() == model.config.vocab_size
    for text in PROMPTS:
        ids = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False) == ids, text  # llama.cpp tokenizes as lmcore does
        assert _greedy(llm, ids, N_TOKENS) == _ours_greedy(model, ids, N_TOKENS), text


def test_f16_agrees_on_the_first_tokens(llama_cpp, exported, ours):
    model, tok = ours
    llm = _llama(llama_cpp, exported["f16"])
    for text in PROMPTS:
        ids = tok.encode(text)
        assert _greedy(llm, ids, F16_TOKENS) == _ours_greedy(model, ids, F16_TOKENS), text


def test_chat_template_reply_equals_lmcore(llama_cpp, exported, ours):
    model, tok = ours
    llm = _llama(llama_cpp, exported["f32"])
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    assert llm.chat_format == "chat_template.default"  # the GGUF's own template (Jinja), not a built-in format
    ids = prompt_ids(tok, CHAT)
    reply = "".join(stream_text(model, tok, ids, N_TOKENS, temperature=0, stop_ids=stop_tokens(tok)))
    theirs = llm.create_chat_completion(messages=CHAT, temperature=0.0, top_k=1, max_tokens=N_TOKENS)
    assert theirs["choices"][0]["message"]["content"] == reply
    assert "Paris" in reply, reply


def test_decode_speed_benchmark_runs_llama_cpp_beside_lmcore(llama_cpp, exported, capsys, one_thread):
    """`python -m benchmarks.decode_speed --gguf` on the fine-tuned model, a few tokens: every engine's row,
    lmcore's and transformers' greedy ids equal llama.cpp's, and the floor of lmcore's step (its matrix products)."""
    from benchmarks import decode_speed

    decode_speed.main(["--gguf", str(exported["f32"]), "--threads", "1", "--prompt-len", "8", "--new-tokens", "4",
                       "--batch", "3", "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")][1:]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        ("llama.cpp", "1"), ("lmcore", "1"), ("lmcore", "3"), ("transformers", "1")]
    assert all(float(r[2]) > 0 for r in rows) and rows[0][3].strip() == "1.00x"
    assert [r[4].strip() for r in rows] == ["-", "yes", "-", "yes"]
    floor = re.search(r"matrix products alone .*: ([\d.]+) ms a token, ([\d.]+) GB/s; .* decode ([\d.]+) tok/s", out)
    assert floor and float(floor[1]) > 0 and float(floor[2]) > 0, out
    assert float(floor[3]) > float(rows[1][2])  # nothing but the products: faster than lmcore's whole step
