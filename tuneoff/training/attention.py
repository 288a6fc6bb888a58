"""Attention over packed rows that computes only within each example.

A packed row holds several examples (packing.py). transformers reads the restarting position ids as
example boundaries and builds a block-diagonal mask over the whole row, so SDPA still computes, then
masks away, attention between every pair of the row's positions: a 448-token row holding four
examples does about four times the attention work it needs (and, with a mask, grouped-query
attention copies its key/value heads). `packed_attention` runs SDPA causally on each example's span
instead, from spans the loss computes once per batch on the host (modeling/loss.py batch_loss). Same result
(tests/test_packing.py compares logits and gradients); what it gains depends on how many examples
share a row (docs/performance.md has the measurements). Used on a CPU only: on a GPU, one small
kernel launch per example per layer was not measured against the masked SDPA it would replace.

Registered with transformers' AttentionInterface, the documented way to plug in an attention
function; the model uses it only inside `packed(model)`, so a saved model's config keeps SDPA.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from tuneoff.modeling.loss import PACKED_ATTENTION


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     packed_spans=None, **kwargs):
    """Causal SDPA on each span of `packed_spans`; without spans, transformers' SDPA as usual.
    query [batch, heads, seq, dim], key/value [batch, kv_heads, seq, dim]; returns [batch, seq, heads, dim]."""
    if packed_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    dtype = value.dtype  # the projections' compute dtype (rotary embeddings can leave q and k in float32)
    if any(t.dtype != torch.float32 for t in (query, key, value)):
        # PyTorch's CPU flash attention is slower on bf16 inputs than on float32 ones
        # (benchmarks/results/step_parts.md, `benchmarks/step_parts.py attention --dtype bf16`): attend in
        # float32, outside autocast (which would cast the inputs straight back). The projections around it stay
        # in bf16.
        query, key, value = query.float(), key.float(), value.float()
    rows = []
    # unbind and split, not slicing: their backward joins the pieces' gradients in one stack or cat,
    # where each slice's backward would write into a zeroed tensor the size of the whole input
    for row_spans, q, k, v in zip(packed_spans, query.unbind(0), key.unbind(0), value.unbind(0)):
        sizes = [b - a for a, b in row_spans]
        # each span's output transposed to [span, heads, dim]: joined along the sequence, that is the
        # layout o_proj reads, so there is no copy beyond the join
        # (4-d inputs: with 3-d ones SDPA on a CPU takes its slow math path, not the flash kernel)
        with torch.autocast(query.device.type, enabled=False):
            rows.append(torch.cat([F.scaled_dot_product_attention(qs[None], ks[None], vs[None], dropout_p=dropout,
                                                                  is_causal=True, scale=scaling, enable_gqa=gqa)[0].transpose(0, 1)
                                   for qs, ks, vs in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1))]))
    return torch.stack(rows).to(dtype), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)  # the mask only the no-spans fallback reads


@contextlib.contextmanager
def packed(model):
    """Use packed_attention in `model` (a transformers or PEFT model) for the duration."""
    before = model.config._attn_implementation
    model.set_attn_implementation(PACKED_ATTENTION)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)
