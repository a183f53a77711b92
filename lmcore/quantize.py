"""Quantized inference on CPU: the transformer blocks' linear layers in int8, for faster decoding.

    model = quantize(load_model("models/instruct"), "int8")  # in place; then generate, serve or score it as before
    lmcore serve --model models/instruct --quantize int8     # the same, at load time

`int8` is dynamic W8A8: every nn.Linear of the blocks (attention qkv and proj, the MLP's) becomes an `Int8Linear`
whose weight is int8 with one scale per output channel; at each call the input is quantized to int8 with one scale
per token (its row's absolute max), multiplied int8 x int8 -> int32 (`torch._int_mm`), and scaled back to
float. Decoding a small model on a CPU is bound by reading the weights, and int8 reads a quarter of float32's bytes
(SmolLM2-135M, 2 threads: benchmarks/quantize_speed.py).

Why not `torch.ao.quantization.quantize_dynamic`: it quantizes a layer's whole input with one 7-bit scale, and
Llama-style models carry "massive activations" (SmolLM2: a few channels of the MLP's down projection reach 3000
where the rest are ~0.1), which that one scale rounds to nothing: its SmolLM2 logits differ from float in top-1
on 2 tokens in 3. It is also deprecated (torch.ao, quantized tensors) and torchao's eager int8 is slower than
float32 on CPU without torch.compile. Per-token scales fix most of it; SmoothQuant (Xiao et al. 2023) the rest: a
per-input-channel factor s = sqrt(max|x| / max|W|) moves the outliers' range from the activations into the weight
(x / s and W * s give the same product), the activation maxima measured once on calibration tokens (a fixed random
sample unless given). KL(float || int8) of the next-token distribution on real text, SmolLM2: per-tensor 1.47,
per-token 0.050, per-token smoothed 0.016-0.025 (weight-only int8: 0.004).

What stays float: the token embedding and the LM head (tied in SmolLM2 and GPT-2: one tensor; the head is one
matmul per token that generation already runs on a transposed copy, see lmcore.generation.decode_head), the norms,
attention itself (softmax and the KV cache). A quantized model is for inference only: its int8 buffers get no
gradients, and its state dict is refused (save_model would write weights no GPT loads). LoRA adapters are merged
first (lmcore.finetune.lora.merge_lora).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmcore.errors import InputError
from lmcore.finetune.lora import LoRALinear
from lmcore.model import GPT

NONE, INT8 = "none", "int8"
MODES = (NONE, INT8)  # what --quantize takes; None is NONE
SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength: s = max|x|^a / max|W|^(1-a)
# The default calibration: this many rows of random token ids (seed CALIBRATION_SEED), each as long as the context
# allows up to CALIBRATION_TOKENS. Massive activations sit in fixed channels whatever the text (they follow position
# and delimiter tokens); on SmolLM2 random tokens and real text give KL 0.020 and 0.016 above.
CALIBRATION_ROWS, CALIBRATION_TOKENS, CALIBRATION_SEED = 8, 128, 0
_EPS = 1e-12


class Int8Linear(nn.Module):
    """y = x @ W.T + b with W in int8 (a scale per output channel) and x quantized per token at each call.

    Buffers: weight_int8 (N, K) int8, weight_scale (N,), input_scale (K,) the SmoothQuant factor 1/s each input
    channel is multiplied by before quantizing (ones: none), bias (N,) or None. Inputs (..., K) of any float dtype;
    the output has the input's dtype, computed in float32.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, smooth: torch.Tensor | None = None):
        """Args: weight (N, K) and bias (N,) of the float layer; smooth (K,): SmoothQuant's s (None: ones)."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        smooth = torch.ones(self.in_features, device=w.device) if smooth is None else smooth.float()
        w = w * smooth  # (N, K): x @ W.T == (x / s) @ (W * s).T
        scale = w.abs().amax(dim=1).clamp(min=_EPS) / 127  # (N,)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("input_scale", 1.0 / smooth)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_max: torch.Tensor | None = None,
                    alpha: float = SMOOTH_ALPHA) -> Int8Linear:
        """An nn.Linear in int8; with input_max (K,), the calibrated max |x| of each input channel, smoothed."""
        smooth = None if input_max is None else smoothing(input_max, linear.weight, alpha)
        return cls(linear.weight, linear.bias, smooth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float() * self.input_scale  # (M, K), M = all tokens
        scale = x2.abs().amax(dim=1, keepdim=True).clamp_(min=_EPS) / 127  # (M, 1): one scale per token
        q = x2.div_(scale).round_().to(torch.int8)  # (M, K), in [-127, 127]
        y = torch._int_mm(q, self.weight_int8.t()).float()  # (M, N): int8 x int8 summed in int32
        y = y.mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)  # (..., N)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # save_model would write a folder whose weights no GPT loads (int8 under other names): refuse, at once
        raise InputError("a quantized model is for inference only and cannot be saved: save the float model, and "
                         "quantize it again where it is loaded")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def smoothing(input_max: torch.Tensor, weight: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> torch.Tensor:
    """SmoothQuant's per-input-channel factor s (K,) = max|x|^alpha / max|W[:, k]|^(1 - alpha); 1 for a channel that
    was zero in calibration or has a zero weight column (nothing to balance)."""
    x_max = input_max.float()
    w_max = weight.detach().abs().amax(dim=0).float()  # (K,)
    s = x_max.pow(alpha) / w_max.pow(1 - alpha)
    return torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))


def block_linears(model: GPT) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every linear layer in the transformer blocks (qkv, attn proj, MLP), in order."""
    return [
        (parent, name, child)
        for block in model.blocks
        for parent in (block.attn, block.mlp)
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear | Int8Linear | LoRALinear)
    ]


@torch.no_grad()
def input_maxima(model: GPT, calibration: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
    """max |x| per input channel (K,) of every block linear over the calibration tokens (B, T), run without a cache."""
    maxima: dict[nn.Module, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple, _out) -> None:
        m = args[0].detach().abs().flatten(0, -2).amax(dim=0).float()  # (K,)
        maxima[module] = torch.maximum(maxima[module], m) if module in maxima else m

    hooks = [child.register_forward_hook(record) for _, _, child in block_linears(model)]
    was_training = model.training
    model.eval()
    try:
        model.hidden(calibration)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return maxima


def default_calibration(model: GPT) -> torch.Tensor:
    """CALIBRATION_ROWS rows of random token ids (B, T), seeded: the same for the same model shape."""
    T = min(CALIBRATION_TOKENS, model.config.context_length)
    g = torch.Generator().manual_seed(CALIBRATION_SEED)
    return torch.randint(0, model.config.vocab_size, (CALIBRATION_ROWS, T), generator=g)


def quantize(model: GPT, mode: str | None, *, calibration: torch.Tensor | None = None) -> GPT:
    """Quantize `model` in place for CPU inference: "none" (or None) leaves it as it is, "int8" makes every linear layer of
    its blocks an Int8Linear (SmoothQuant-smoothed, calibrated on `calibration`); see the module docstring.

    Args:
        mode: one of MODES; None is "none".
        calibration: (B, T) token ids the activation maxima are measured on; None: `default_calibration`.
    Returns: the model itself (in eval mode: a quantized model does not train).
    Raises InputError for an unknown mode, a model not on the CPU, one already quantized or with LoRA adapters.
    """
    if mode not in (None, *MODES):
        raise InputError(f"unknown quantization {mode!r}; choose one of: {', '.join(MODES)}")
    if mode in (None, NONE):
        return model
    device = model.wte.weight.device
    if device.type != "cpu":
        raise InputError(f"--quantize {mode} runs on the CPU only (torch._int_mm); the model is on {device}: "
                         "serve it unquantized there, or load it on the CPU")
    layers = block_linears(model)
    if any(isinstance(child, Int8Linear) for _, _, child in layers):
        raise InputError("the model is quantized already")
    if any(isinstance(child, LoRALinear) for _, _, child in layers):
        raise InputError("the model has LoRA adapters: merge them first (lmcore.finetune.lora.merge_lora)")
    if calibration is None:
        calibration = default_calibration(model)
    maxima = input_maxima(model, calibration.to(device))
    with torch.no_grad():
        for parent, name, child in layers:
            setattr(parent, name, Int8Linear.from_linear(child, maxima[child]))
    return model.eval()
