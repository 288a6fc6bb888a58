"""Peak training memory of full fine-tuning, LoRA and QLoRA, predicted from a model's shape.

The prediction follows what PyTorch holds during one optimizer step of tuneoff's loop
(tuneoff/training/loop.py) on a Hugging Face Llama-family model, term by term. Notation: P parameters,
T = batch x seq_len token slots, h hidden, I intermediate, n_h / n_kv heads, d head_dim,
V vocabulary, L layers, K positions the output layer runs on (tuneoff runs it on supervised
positions only: `logits_to_keep`), c bytes of the compute dtype (4 fp32, 2 bf16).

- weights: P x 4 (full: float32 master weights, also under bf16 autocast), P x c (LoRA: the
  frozen base in the compute dtype), and for QLoRA 0.5 byte per Linear weight of the decoder
  layers (bitsandbytes NF4 packs two 4-bit values per byte) + the rest (embedding, output layer,
  norms, biases) in c. `bf16-pure` stores everything in bf16 (torchtune's `dtype: bf16`).
  Source: the dtypes tuneoff/modeling/methods.py loads with; bitsandbytes `Params4bit`.
- quantization constants (QLoRA): one absmax per 64-weight block, float32 (4/64 byte per
  weight), or with double quantization a uint8 per block plus a float32 per 256 blocks
  (1/64 + 4/16384 byte per weight) and a 256-entry code. Source: Dettmers et al. 2023 (QLoRA,
  section 3) and bitsandbytes `quantize_4bit`; checked against the saved models/base-nf4.
- LoRA parameters: r x (in + out) per adapted Linear per layer, float32 (PEFT keeps adapters in
  float32 over a bf16 or 4-bit base: `autocast_adapter_dtype`). Source: Hu et al. 2021; PEFT
  `LoraLayer.update_layer`.
- gradients: one per trainable parameter in its dtype (P x 4 full, adapters x 4 LoRA).
- optimizer states: torch AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype (8 bytes
  per float32 parameter); bitsandbytes 8-bit AdamW keeps two uint8 states plus a float32 absmax
  per 256-value block (2 + 8/256 bytes), and 32-bit state for tensors under 4,096 values;
  paged variants allocate the same states in CUDA unified memory, which the driver pages to CPU
  RAM when the GPU fills, so on a GPU they are reported apart and not counted against it (nor in
  torch.cuda.max_memory_allocated). On a CPU there is no paging (bitsandbytes falls back to the
  unpaged optimizer): the states are ordinary memory, counted. Source: torch.optim.AdamW;
  Dettmers et al. 2022 (8-bit optimizers); bitsandbytes `Optimizer2State`.
- activations: every tensor autograd saves for backward, derived op by op from the HF Llama
  forward (see `_decoder_layer`); with gradient checkpointing, each layer's input (T x h) plus
  one layer's activations, recomputed during its backward. The two terms that usual formulas
  (Korthikanti et al. 2022, which assumes fused fp16 kernels) leave out and that matter here:
  RMSNorm upcasts its input to float32 and saves it, and packed rows give scaled-dot-product
  attention a block-diagonal mask that each layer converts to a b x s x s float tensor it keeps.
  Under bf16 autocast every Linear with a float32 weight keeps a bf16 copy of it (2 x P bytes for
  full fine-tuning) and a bf16 copy of its input. tests/test_memory.py compares this term with
  the tensors autograd actually saves (torch.autograd.graph.saved_tensors_hooks), exactly.
- transient: the largest short-lived buffers at the moment of the peak: the loss over K x V
  logits (log-softmax output, its gradient and the logits' gradient: 3 x K x V x 4 bytes), the
  output layer's weight gradient, a dequantized 4-bit weight (QLoRA), a decoder layer's backward,
  and the optimizer step (CPU AdamW: two temporaries of the largest parameter; CUDA's foreach
  AdamW: one temporary the size of all exp_avg_sq; bitsandbytes on CUDA: none, its kernels are
  fused; bitsandbytes on a CPU, plain torch ops on one tensor at a time: float32 copies of the
  largest one, 5 for an 8-bit update (both dequantized states, the gradient, the denominator and
  its square root), 3 for a 32-bit one, and one more of the weight when it is not float32:
  measured with torch's profiler, bitsandbytes 0.50).
- framework overhead: memory a training process holds outside its tensors. On a CPU the peak
  resident set also counts the Python process with torch, transformers and peft loaded
  (`estimate.overhead_gib.cpu`, measured); on a GPU the CUDA context and library handles are
  outside torch.cuda.max_memory_allocated but inside the card's memory (`overhead_gib.cuda`).

The peak is the largest of three moments of a step: the start of backward (weights + optimizer
states + all activations + the loss buffers), the end of backward (weights + states + all
gradients), and the optimizer step (weights + states + gradients + the step's temporaries).
With gradient accumulation (`accumulates`: a step's rows run forward and backward in micro-batches)
the activations are one micro-batch's, and from the step's second micro-batch on the gradients the
earlier ones left are held through the whole pass, so they count at every moment.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from tuneoff.core.errors import TuneoffError
from tuneoff.core.methods import METHODS
from tuneoff.estimator.architectures import LAYER_LINEARS, Shape

Method = str  # a name of tuneoff/core/methods.py METHODS (checked in Setup.__post_init__)
Precision = Literal["fp32", "bf16", "bf16-pure"]
Optimizer = Literal["adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit"]
Attention = Literal["packed", "per-example", "causal"]
PRECISIONS = ("fp32", "bf16", "bf16-pure")
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit")
NF4_BLOCK, NF4_BLOCK2 = 64, 256  # bitsandbytes 4-bit blocksize; nested (double-quant) blocksize
BNB_8BIT_BLOCK, BNB_MIN_8BIT_SIZE = 256, 4096  # bitsandbytes blockwise 8-bit optimizer


@dataclass(frozen=True)
class Setup:
    """One training configuration: everything besides the model's shape that sets its memory. No field
    has a default: the CLI and the train stage fill them from params.yaml (estimate.setup_for_run)."""

    method: Method
    batch_size: int  # rows per forward and backward pass: an optimizer step's, or with `accumulates` a micro-batch's
    seq_len: int  # tokens per row
    precision: Precision  # fp32; bf16 = autocast (tuneoff's bf16); bf16-pure = weights and states in bf16
    device: Literal["cpu", "cuda"]
    optimizer: Optimizer
    gradient_checkpointing: bool
    rank: int | None  # LoRA's: None for full (which ignores any)
    target_modules: tuple[str, ...] | None  # LoRA's: None for full (which ignores any)
    dropout: float | None  # LoRA's dropout: None for full (which ignores any)
    supervised_positions: int | None  # K: positions per step the output layer runs on; None = all
    # packed: rows under SDPA's block-diagonal mask (tuneoff on a GPU); per-example: causal SDPA on each
    # example's span of a packed row (tuneoff on a CPU, attention.py); causal: SDPA's is_causal on whole rows
    attention: Attention
    double_quant: bool  # QLoRA's quantization constants
    gpus: int  # devices training together, each on its share of a step's rows (time divides by them)
    sharded: bool  # with gpus > 1: FSDP full sharding of weights, gradients and optimizer states; False = DDP (replicated)
    accumulates: bool  # gradient accumulation: a step is several passes of batch_size rows, its gradients held between them

    def __post_init__(self):
        for key, value, allowed in (("precision", self.precision, PRECISIONS), ("optimizer", self.optimizer, OPTIMIZERS),
                                    ("method", self.method, tuple(METHODS)),
                                    ("attention", self.attention, ("packed", "per-example", "causal")), ("device", self.device, ("cpu", "cuda"))):
            if value not in allowed:
                raise TuneoffError(f"{key} {value!r}: allowed: {list(allowed)}")
        if self.adapter and None in (self.rank, self.target_modules, self.dropout):
            raise TuneoffError(f"method {self.method}: an adapter needs its rank, target modules and dropout "
                               f"(train.{self.method})")
        if min(self.batch_size, self.seq_len, self.gpus) < 1 or self.rank is not None and self.rank < 1:
            raise TuneoffError("batch size, sequence length, rank and gpus must be at least 1")
        unknown = [m for m in self.target_modules or () if m not in (*LAYER_LINEARS, "lm_head")]
        if self.adapter and (unknown or not self.target_modules):
            raise TuneoffError(f"target modules {unknown or '[]'}: allowed: {[*LAYER_LINEARS, 'lm_head']} (or all-linear)")

    @property
    def adapter(self) -> bool:
        """LoRA adapters on a frozen base (lora, qlora); otherwise every weight trains (full)."""
        return METHODS[self.method].adapter

    @property
    def quantized(self) -> bool:
        """The frozen base is 4-bit NF4 (qlora)."""
        return METHODS[self.method].quantized

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def positions(self) -> int:
        return self.tokens if self.supervised_positions is None else min(self.supervised_positions, self.tokens)


def expand_targets(modules: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """PEFT's `all-linear`: every Linear of the decoder layers, not the output layer."""
    out: list[str] = []
    for m in modules:
        out += LAYER_LINEARS if m == "all-linear" else [m]
    return tuple(dict.fromkeys(out))


@dataclass
class Estimate:
    """Bytes per term, the peak and the moment it happens; see the module docstring for each formula."""

    terms: dict[str, int]  # the size of each term (gradients and activations are not both alive at the peak)
    at_peak: dict[str, int]  # the terms alive at the peak, with the transient buffers of that moment
    activations: dict[str, int]  # the activation term, itemized
    peak_tensor_bytes: int  # what torch.cuda.max_memory_allocated would report
    overhead_bytes: int
    phase: str  # the moment of the step the peak happens at
    phases: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        """Tensors + framework overhead: the peak resident set on a CPU, the card's memory on a GPU."""
        return self.peak_tensor_bytes + self.overhead_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "peak_bytes": self.peak_bytes}


def _dtype_bytes(setup: Setup) -> tuple[int, int, int, bool]:
    """(compute, residual stream, adapter, autocast) bytes per value for a method and precision."""
    compute = 4 if setup.precision == "fp32" else 2
    adapter = 2 if setup.precision == "bf16-pure" else 4
    full_master = 2 if setup.precision == "bf16-pure" else 4
    residual = compute if setup.adapter else full_master  # the embedding's dtype carries through the adds
    return compute, residual, adapter, setup.precision == "bf16"


def parameter_counts(shape: Shape, setup: Setup) -> dict[str, int]:
    """Trainable and total parameters as tuneoff reports them (methods.trainable_and_total), exactly."""
    total = shape.parameter_count()
    if not setup.adapter:
        return {"trainable": total, "total": total, "lora": 0}
    lora = lora_parameters(shape, setup)
    return {"trainable": lora, "total": total + lora, "lora": lora}


def lora_parameters(shape: Shape, setup: Setup) -> int:
    per_layer = sum(setup.rank * sum(shape.linear(m)[:2]) for m in setup.target_modules if m != "lm_head")
    head = setup.rank * (shape.hidden + shape.vocab) if "lm_head" in setup.target_modules else 0
    return shape.layers * per_layer + head


def quant_constant_bytes(n: int, double_quant: bool) -> int:
    """bitsandbytes' quant state of one 4-bit weight of n values (blocksize 64)."""
    blocks = math.ceil(n / NF4_BLOCK)
    if not double_quant:
        return blocks * 4 + 16 * 4  # float32 absmax per block + the 16-value NF4 code
    return blocks + math.ceil(blocks / NF4_BLOCK2) * 4 + 256 * 4 + 16 * 4 + 4  # uint8 absmax, float32 absmax2, codes, offset


def _weights(shape: Shape, setup: Setup) -> tuple[int, int]:
    """(weight bytes, quantization-constant bytes) of the base model."""
    compute, _, _, _ = _dtype_bytes(setup)
    total = shape.parameter_count()
    rope = shape.head_dim * 4  # RoPE's inv_freq and original_inv_freq buffers: d/2 float32 values each
    if not setup.adapter:
        return total * (2 if setup.precision == "bf16-pure" else 4) + rope, 0
    if not setup.quantized:
        return total * compute + rope, 0
    quantized = [shape.linear(m) for m in LAYER_LINEARS]
    q_weights = shape.layers * sum(i * o for i, o, _ in quantized)
    packed = shape.layers * sum(math.ceil(i * o / 2) for i, o, _ in quantized)
    constants = shape.layers * sum(quant_constant_bytes(i * o, setup.double_quant) for i, o, _ in quantized)
    return packed + (total - q_weights) * compute + rope, constants


def _optimizer_bytes(trainable_tensors: list[int], setup: Setup, param_bytes: int) -> int:
    """State bytes of the optimizer over tensors of these sizes (all of one dtype)."""
    if setup.optimizer in ("adamw",):
        return 2 * param_bytes * sum(trainable_tensors)
    if setup.optimizer == "paged-adamw":
        return 8 * sum(trainable_tensors)  # bitsandbytes 32-bit states are float32 whatever the weights are
    return sum(8 * n if n < BNB_MIN_8BIT_SIZE else 2 * n + 8 * math.ceil(n / BNB_8BIT_BLOCK)
               for n in trainable_tensors)


def _trainable_tensors(shape: Shape, setup: Setup) -> list[int]:
    """Sizes of the trainable tensors (what the optimizer keeps state for)."""
    if not setup.adapter:
        layer = [shape.linear(m)[0] * shape.linear(m)[1] for m in LAYER_LINEARS]
        layer += [shape.linear(m)[1] for m in LAYER_LINEARS if shape.linear(m)[2]]
        layer += [shape.hidden, shape.hidden] + ([shape.head_dim] * 2 if shape.qk_norm else [])
        head = [] if shape.tied_embeddings else [shape.vocab * shape.hidden]
        return [shape.vocab * shape.hidden, shape.hidden, *head] + layer * shape.layers
    per_layer = [n for m in setup.target_modules if m != "lm_head"
                 for n in (setup.rank * shape.linear(m)[0], setup.rank * shape.linear(m)[1])]
    head = [setup.rank * shape.hidden, setup.rank * shape.vocab] if "lm_head" in setup.target_modules else []
    return per_layer * shape.layers + head


class _Saved:
    """Bytes autograd keeps for backward, by name; shared storages are counted once by key."""

    def __init__(self):
        self.items: dict[str, int] = {}
        self.keys: set[str] = set()

    def add(self, name: str, nbytes: int, key: str | None = None) -> None:
        if key is not None:
            if key in self.keys:
                return
            self.keys.add(key)
        self.items[name] = self.items.get(name, 0) + nbytes

    @property
    def total(self) -> int:
        return sum(self.items.values())


def _norm(saved: _Saved, tokens: int, width: int, x_bytes: int, rg_in: bool, trainable: bool, x_key: str,
          name: str) -> tuple[int, bool]:
    """HF LlamaRMSNorm: x.to(float32) (saved by pow), rsqrt (saved), then weight * x_hat.to(x.dtype),
    which saves x_hat when the weight trains. Returns (output bytes per value, output requires grad)."""
    if rg_in:
        saved.add(f"{name} input (float32)", tokens * width * 4, key=x_key if x_bytes == 4 else None)
        saved.add(f"{name} rsqrt", tokens * 4)
    if trainable:
        saved.add(f"{name} normalized", tokens * width * x_bytes)
    return x_bytes, rg_in or trainable


def _linears(saved: _Saved, setup: Setup, shape: Shape, modules: tuple[str, ...], tokens: int, in_bytes: int,
             rg_in: bool, in_key: str, compute: int, adapter: int, autocast: bool, weight_copy_bytes: list[int],
             group: str) -> dict[str, bool]:
    """Linears reading the same input: what each saves, and whether each output requires grad."""
    full = not setup.adapter
    out_rg = {}
    for m in modules:
        fan_in, fan_out, _ = shape.linear(m)
        lora = setup.adapter and m in setup.target_modules
        if full:
            if autocast and in_bytes != compute:  # autocast casts a non-leaf input per op, each copy saved
                saved.add(f"{group} input, {compute}-byte copies", tokens * fan_in * compute)
            else:
                saved.add(f"{group} input", tokens * fan_in * in_bytes, key=in_key)
            if autocast:  # the cached bf16 copy of the float32 weight
                weight_copy_bytes.append(fan_in * fan_out * compute)
        if lora:
            _adapter(saved, setup, tokens, fan_in, fan_out, in_bytes, rg_in, in_key, compute, adapter, autocast,
                     weight_copy_bytes, group)
        out_rg[m] = rg_in or full or lora
    return out_rg


def _adapter(saved: _Saved, setup: Setup, tokens: int, fan_in: int, fan_out: int, in_bytes: int, rg_in: bool,
             in_key: str, compute: int, adapter: int, autocast: bool, weight_copy_bytes: list[int], group: str):
    """PEFT LoRA: lora_B(lora_A(dropout(x.to(adapter dtype)))) * scale, beside the frozen base."""
    r = setup.rank
    if setup.dropout > 0:
        if rg_in:  # a bool mask: CUDA's fused dropout and, on a CPU, the train loop's dropout.Dropout
            saved.add(f"{group} LoRA dropout mask", tokens * fan_in)
        a_key = None  # a new tensor per adapter
    else:  # lora_A reads x itself when it already has the adapter's dtype, else its own cast copy
        a_key = in_key if in_bytes == adapter else None
    if autocast:  # lora_A's float32 input is cast to bf16 for the matmul, and the copy is saved
        saved.add(f"{group} LoRA A input", tokens * fan_in * compute)
        # bf16 copies of A and B; a linear keeps its weight only to pass a gradient to its input
        weight_copy_bytes.append(r * ((fan_in if rg_in else 0) + fan_out) * compute)
    else:
        saved.add(f"{group} LoRA A input", tokens * fan_in * adapter, key=a_key)
    saved.add(f"{group} LoRA A output", tokens * r * (compute if autocast else adapter))


def _decoder_layer(shape: Shape, setup: Setup, rg_in: bool, index: str) -> tuple[_Saved, list[int]]:
    """What one HF LlamaDecoderLayer saves for backward (and the autocast weight copies it keeps)."""
    compute, residual, adapter, autocast = _dtype_bytes(setup)
    full = not setup.adapter
    b, s, T = setup.batch_size, setup.seq_len, setup.tokens
    nh, nkv, d, h, i = shape.heads, shape.kv_heads, shape.head_dim, shape.hidden, shape.intermediate
    saved, copies = _Saved(), []

    y_bytes, rg_y = _norm(saved, T, h, residual, rg_in, full, f"x{index}", "attention norm")
    rg = _linears(saved, setup, shape, ("q_proj", "k_proj", "v_proj"), T, y_bytes, rg_y, f"y{index}", compute, adapter,
                  autocast, copies, "q/k/v")
    if shape.qk_norm:  # Qwen3 RMS-normalizes q and k per head before RoPE
        for m, heads in (("q_proj", nh), ("k_proj", nkv)):
            _norm(saved, T * heads, d, compute, rg[m], full, f"{m}{index}", "q/k norm")
    attention_rg = rg["q_proj"] or rg["k_proj"] or rg["v_proj"]
    if attention_rg:
        # RoPE writes new q and k; packed rows repeat k and v to every query head (no mask: SDPA's enable_gqa)
        kv_heads = nh if setup.attention == "packed" and nkv < nh else nkv
        # per example, a bf16 run attends in float32 (attention.py): SDPA keeps float32 q, k, v and output
        attended = 4 if setup.attention == "per-example" else compute
        saved.add("attention q, k, v, output", T * d * (2 * nh + 2 * kv_heads) * attended)
        saved.add("attention logsumexp", b * nh * s * 4)
        if setup.attention == "packed":
            saved.add("attention mask (packed rows)", b * s * s * compute)
        # o_proj reads the attention output, which SDPA already keeps (its b,s,h,d layout makes the reshape a view);
        # per example, o_proj reads the join of the spans' outputs, a tensor of its own, kept if o_proj needs it
        if setup.attention != "per-example":
            saved.keys.add(f"attn{index}")
    rg_o = _linears(saved, setup, shape, ("o_proj",), T, compute, attention_rg, f"attn{index}", compute, adapter,
                    autocast, copies, "o_proj")
    rg_h = rg_in or rg_o["o_proj"]

    y2_bytes, rg_y2 = _norm(saved, T, h, residual, rg_h, full, f"h{index}", "MLP norm")
    rg = _linears(saved, setup, shape, ("gate_proj", "up_proj"), T, y2_bytes, rg_y2, f"y2{index}", compute, adapter,
                  autocast, copies, "gate/up")
    if rg["gate_proj"]:  # SiLU keeps its input; act * up keeps up for d(act)
        saved.add("MLP gate (SiLU input)", T * i * compute)
        saved.add("MLP up", T * i * compute)
    if rg["up_proj"]:  # d(up) needs act
        saved.add("MLP SiLU output", T * i * compute)
    _linears(saved, setup, shape, ("down_proj",), T, compute, rg["gate_proj"] or rg["up_proj"], f"p{index}", compute,
             adapter, autocast, copies, "down_proj")
    return saved, copies


def activations(shape: Shape, setup: Setup) -> tuple[dict[str, int], int, int]:
    """Saved-for-backward bytes of one forward pass, itemized; and the bytes of one decoder layer and
    of the head (final norm and output layer), which backward frees before it reaches the layers."""
    compute, residual, adapter, autocast = _dtype_bytes(setup)
    full = not setup.adapter
    T, K = setup.tokens, setup.positions
    # layer 0's input is the embedding output: it needs no grad unless the embedding trains, or HF's
    # gradient checkpointing calls enable_input_require_grads (it does for adapters)
    first_rg = full or setup.gradient_checkpointing
    layer0, copies0 = _decoder_layer(shape, setup, first_rg, "0")
    layer, copies = _decoder_layer(shape, setup, True, "")
    items: dict[str, int] = {}

    def merge(src: dict[str, int], times: int = 1):
        for k, v in src.items():
            items[k] = items.get(k, 0) + v * times

    if setup.gradient_checkpointing:
        # each layer keeps its input; one layer is recomputed at a time during backward
        items["checkpointed layer inputs"] = shape.layers * T * shape.hidden * residual
        if setup.attention == "packed":
            items["packed-rows mask (bool)"] = setup.batch_size * setup.seq_len ** 2
        items["autocast weight copies"] = 0  # made again, one layer at a time, when the layer is recomputed
    else:
        merge(layer0.items)
        merge(layer.items, shape.layers - 1)
        items["autocast weight copies"] = sum(copies0) + sum(copies) * (shape.layers - 1)
    if full:
        items["embedding indices"] = T * 8
    top, head_copies = _Saved(), []
    y_bytes, rg = _norm(top, T, shape.hidden, residual, True, full, "final", "final norm")
    top.add("loss positions (bool)", T)
    if full:  # the output layer keeps its input, K x h
        top.add("output layer input", K * shape.hidden * (compute if autocast else y_bytes))
        if autocast:
            head_copies.append(shape.vocab * shape.hidden * compute)
    if not full and "lm_head" in setup.target_modules:
        _adapter(top, setup, K, shape.hidden, shape.vocab, y_bytes, True, "k", compute, adapter, autocast, head_copies,
                 "output layer")
    items["autocast weight copies"] += sum(head_copies)
    merge(top.items)
    if full or setup.gradient_checkpointing or any(m in setup.target_modules for m in ("q_proj", "k_proj")) or any(
            m in setup.target_modules for m in LAYER_LINEARS) and shape.layers > 1:
        # RoPE's cos and sin (b x s x d, in the residual dtype), shared by every layer's q and k
        items["RoPE cos/sin"] = 2 * T * shape.head_dim * residual
    if not items["autocast weight copies"]:
        del items["autocast weight copies"]
    return items, layer.total + sum(copies), top.total + sum(head_copies)


def estimate(shape: Shape, setup: Setup, overhead_bytes: int) -> Estimate:
    """Predicted memory of one step of `setup` on a model of `shape` (formulas: module docstring)."""
    compute, residual, adapter, autocast = _dtype_bytes(setup)
    full, n = not setup.adapter, setup.gpus
    T, K, V, h = setup.tokens, setup.positions, shape.vocab, shape.hidden
    weights, constants = _weights(shape, setup)
    tensors = _trainable_tensors(shape, setup)
    param_bytes = (2 if setup.precision == "bf16-pure" else 4) if full else adapter
    lora = 0 if full else lora_parameters(shape, setup) * adapter
    grads = sum(tensors) * param_bytes
    states = _optimizer_bytes(tensors, setup, param_bytes)
    paged = states if setup.optimizer.startswith("paged") and setup.device == "cuda" else 0  # no paging on a CPU
    states -= paged
    if n > 1 and setup.sharded:  # FSDP full shard: each GPU keeps 1/n of these, and gathers one layer at a time (2 in flight)
        weights, constants, lora, grads, states, paged = (math.ceil(x / n) for x in (weights, constants, lora, grads,
                                                                                      states, paged))
        gather = 2 * (shape.layer_linear_params + shape.layer_norm_params) * (compute if not full else param_bytes)
    else:
        gather = 0
    acts, layer_acts, head_acts = activations(shape, setup)
    act_bytes = sum(acts.values())
    persistent = weights + constants + lora + states + gather

    # transients at each moment of the step
    loss_backward = 3 * K * V * 4  # log-softmax output (saved), its gradient and the logits' gradient, float32
    # full: the output layer's weight gradient appears while the logits' gradient is alive (under autocast
    # computed for the bf16 copy, then cast to the float32 weight's .grad)
    head_grad = K * V * compute + V * h * param_bytes + (V * h * compute if autocast else 0) if full else 0
    # a decoder layer's backward: the gradient arriving at its output and the one summing at its input
    # (T x h each), and in the MLP the grads of the SiLU output and of up at once (the layer's own saved
    # tensors are freed node by node); with checkpointing the recomputed layer lives meanwhile
    layer_backward = (2 * T * h * residual + 2 * T * shape.intermediate * compute
                      + (layer_acts if setup.gradient_checkpointing else 0))
    dequant = (max(i * o for i, o, _ in (shape.linear(m) for m in LAYER_LINEARS)) * compute
               if setup.quantized else 0)  # bitsandbytes dequantizes one weight per matmul
    embedding_grad = V * h * param_bytes if full and shape.tied_embeddings else 0  # dense, then added to the tied grad
    largest = max(tensors)
    if setup.optimizer != "adamw" and setup.device == "cuda":
        step_temp = 0  # bitsandbytes updates in fused kernels
    elif setup.optimizer != "adamw":  # bitsandbytes' CPU ops: float32 copies of one tensor's states, grad, ...
        copies = 5 if setup.optimizer.endswith("8bit") and largest >= BNB_MIN_8BIT_SIZE else 3
        step_temp = (copies + (param_bytes != 4)) * 4 * largest
    elif setup.device == "cuda":
        step_temp = math.ceil(sum(tensors) * param_bytes / n)  # foreach: sqrt(exp_avg_sq) for every tensor at once
    else:
        step_temp = 2 * largest * param_bytes  # for-loop AdamW: sqrt and the division of one tensor
    layer_grads = V * h * param_bytes if full else grads  # full: the output layer's gradient is there already
    held = grads if setup.accumulates else 0  # the gradients of the step's earlier micro-batches
    moments = {
        "loss backward": {"activations": act_bytes, "gradients": held, "transient": max(loss_backward, head_grad)},
        "last layer backward": {"activations": act_bytes - head_acts,
                                "gradients": held or math.ceil(layer_grads / n),
                                "transient": layer_backward + dequant},
        "end of backward": {"gradients": grads, "transient": embedding_grad + T * h * residual},
        "optimizer step": {"gradients": grads, "transient": step_temp},
    }
    phases = {name: persistent + sum(parts.values()) for name, parts in moments.items()}
    phase = max(phases, key=phases.get)
    terms = {"weights": weights, "quantization constants": constants, "LoRA parameters": lora, "gradients": grads,
             "optimizer states": states, "optimizer states (paged)": paged, "activations": act_bytes,
             "FSDP gather buffers": gather}
    at_peak = {"weights": weights, "quantization constants": constants, "LoRA parameters": lora,
               "optimizer states": states, "FSDP gather buffers": gather, **moments[phase]}
    return Estimate(terms=terms, at_peak={k: v for k, v in at_peak.items() if v}, activations=acts,
                    peak_tensor_bytes=phases[phase], overhead_bytes=overhead_bytes, phase=phase, phases=phases,
                    params=parameter_counts(shape, setup))
