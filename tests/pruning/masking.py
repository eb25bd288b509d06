"""The masked unpruned model that a pruned model must equal, written out independently of the
library: every weight (and bias) a removed head / channel owns is zeroed in place."""

import torch

from fedspine.pruning import KeptIndexMap, layer_roles


def zero_removed(model, positions, group, head_dim):
    """Zero what the units *not* at ``positions`` (per layer: query-head and channel positions
    of the current model) own: q rows (and bias) and o columns of a head; the K/V rows of a KV
    group whose query heads are all gone; MLP input rows (and biases) and output columns."""
    with torch.no_grad():
        for lr, (heads, chans) in zip(layer_roles(model), positions, strict=True):
            n_heads = lr.q.out_features // head_dim
            for h in sorted(set(range(n_heads)) - set(heads)):
                rows = slice(h * head_dim, (h + 1) * head_dim)
                lr.q.weight[rows] = 0
                lr.o.weight[:, rows] = 0
                if lr.q.bias is not None:
                    lr.q.bias[rows] = 0
                if h % group == 0:  # the KV head of a fully removed group
                    kv = slice(h // group * head_dim, (h // group + 1) * head_dim)
                    for m in (lr.k, lr.v):
                        m.weight[kv] = 0
                        if m.bias is not None:
                            m.bias[kv] = 0
            drop = sorted(set(range(lr.mlp_in[0].out_features)) - set(chans))
            for m in lr.mlp_in:
                m.weight[drop] = 0
                if m.bias is not None:
                    m.bias[drop] = 0
            lr.mlp_out.weight[:, drop] = 0


def mask_like(model, kept: KeptIndexMap):
    """``model`` (unpruned, in place) with everything ``kept`` removed zeroed."""
    s = kept.shape
    zero_removed(model, [(lk.heads, lk.channels) for lk in kept.layers], s.group_size, s.head_dim)
    return model
