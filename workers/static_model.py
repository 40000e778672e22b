"""A compact Llama / Qwen2 forward over a paged KV pool: the static verifier's model side.

gpt-fast's shape: the KV memory is allocated once (``PagedKV``: ``[layers, pages, kv_heads,
page_size, head_dim]`` for keys and for values, one spare page for padding), a forward writes
each new token's keys and values in place at its page and offset, and attends over the pages of
its own session through a block table. Sessions of one batch have their own cached lengths
(``lengths``) and positions; nothing is gathered into or scattered out of a per-session cache,
and cropping a session to its accepted prefix is a length update on the host.

Only the attention is written here. Embeddings, norms, projections, MLP, rotary embedding and
head are the Hugging Face model's own modules, called directly, so the weights are shared with
the eager backend and the numerics are transformers' own. Supported: ``llama`` and ``qwen2``
without sliding-window layers (``supports``).

Hidden states use transformers' ``output_hidden_states`` numbering: 0 is the embeddings, i is
the output of decoder layer i, and -1 (= number of layers) the final-norm output that feeds the
head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

SUPPORTED = ("llama", "qwen2")


def supports(model) -> str:
    """"" when the static forward can run ``model``, else why not (for the fallback's log line)."""
    config = model.config
    if config.model_type not in SUPPORTED:
        return f"architecture {config.model_type!r} is not one of {', '.join(SUPPORTED)}"
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return "sliding-window attention layers"
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        return "the model is spread over several devices (device_map)"
    return ""


class PagedKV(nn.Module):
    """The KV pool (module buffers, so a compiled forward may mutate them in place) and the host's
    page bookkeeping. Page ``pages`` (the last) is the spare page padding writes to."""

    def __init__(self, config, *, pages: int, page_size: int, dtype, device):
        super().__init__()
        heads = config.num_key_value_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (config.num_hidden_layers, pages + 1, heads, page_size, dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.pages = pages
        self.page_size = page_size
        self.spare = pages
        self.free: list[int] = list(range(pages - 1, -1, -1))  # a stack: pop() takes the lowest

    def page_bytes(self) -> int:
        return 2 * self.keys[:, 0].numel() * self.keys.element_size()

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def grow(self, held: list[int], tokens: int) -> bool:
        """Give ``held`` pages enough for ``tokens`` tokens; False (and nothing taken) if the pool is short."""
        need = self.pages_for(tokens) - len(held)
        if need > len(self.free):
            return False
        for _ in range(max(0, need)):
            held.append(self.free.pop())
        return True

    def shrink(self, held: list[int], tokens: int) -> None:
        """Keep only the pages ``tokens`` tokens need (cropping is this and a length update)."""
        keep = self.pages_for(tokens)
        while len(held) > keep:
            self.free.append(held.pop())


class StaticModel(nn.Module):
    """``forward(input_ids [B, T], lengths [B], block_table [B, P])``: row b's tokens sit at
    positions ``lengths[b] .. lengths[b] + T``; its keys/values are written to its pages, and it
    attends to every position up to its own. Returns logits ``[B, T, vocab]`` (or None) and the
    hidden states asked for, ``[len(hidden_layers), B, T, hidden]`` (or None), or with
    ``hidden_rows`` (flat indices b * T + t) only those rows, ``[len(hidden_layers), rows, hidden]``.

    ``packed`` (flat indices b * T + t of the real tokens, ascending): a ragged batch. Everything
    but the attention (embeddings, projections, MLP, norms, head: nearly all the compute) runs
    on those tokens only, and only they write keys and values; the attention alone sees the
    padded ``[B, T]`` layout, the padding's queries zeros. Why: uncompiled, a CPU forward costs
    about in proportion to its rows, and 13 one-token rows beside one nine-token tree took 487 ms
    padded against 177 ms packed (bench/ragged_forward.py). The padding's logits and hidden
    states come back as zeros."""

    def __init__(self, hf_model, kv: PagedKV):
        super().__init__()
        self.hf = hf_model
        self.kv = kv
        self.layers = hf_model.model.layers
        self.count = len(self.layers)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor, block_table: torch.Tensor,
                hidden_layers: tuple[int, ...] = (), logits: bool = True, hidden_rows: torch.Tensor | None = None,
                depths: torch.Tensor | None = None, tree: torch.Tensor | None = None,
                packed: torch.Tensor | None = None):
        """``depths`` [B, T] and ``tree`` [B, T, T] (bool, row i may see new token j): token trees.
        New token t of row b is still stored at slot lengths[b] + t, but sits at position
        lengths[b] + depths[b, t] and attends to the cache and to the new tokens ``tree`` allows
        (its ancestors and itself). Without them, the new tokens are a chain."""
        core = self.hf.model
        batch, width = input_ids.shape
        page = self.kv.page_size
        slots = lengths[:, None] + torch.arange(width, device=input_ids.device)  # [B, T]
        pages_at = block_table.gather(1, slots // page)  # [B, T]: where each new token goes
        offsets = slots % page
        span = block_table.shape[1] * page
        keys_at = torch.arange(span, device=input_ids.device)[None, None, :]
        if tree is None:
            positions = slots
            visible = keys_at <= slots[:, :, None]  # [B, T, span]
        else:
            positions = lengths[:, None] + depths
            new = keys_at - lengths[:, None, None]  # [B, 1, span]: index among the new tokens, < 0 in the cache
            allowed = tree.gather(2, new.clamp(0, width - 1).expand(batch, width, span))
            visible = (new < 0) | ((new < width) & allowed)
        mask = visible[:, None]  # [B, 1, T, span], broadcast over heads
        if packed is not None:  # [1, N]: the real tokens of the batch, one row
            input_ids, positions, pages_at, offsets = (t.flatten()[packed][None] for t in (input_ids, positions, pages_at, offsets))
        layout = (batch, width, packed)

        x = core.embed_tokens(input_ids)
        cos, sin = core.rotary_emb(x, positions)
        wanted = {i % (self.count + 1) for i in hidden_layers}
        kept: dict[int, torch.Tensor] = {0: x} if 0 in wanted else {}
        for index, layer in enumerate(self.layers):
            x = x + self._attention(index, layer, layer.input_layernorm(x), cos, sin, pages_at, offsets, block_table, mask,
                                    layout)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if index + 1 in wanted and index + 1 < self.count:
                kept[index + 1] = x
        x = core.norm(x)
        if self.count in wanted:
            kept[self.count] = x
        hidden = torch.stack([kept[i % (self.count + 1)] for i in hidden_layers]) if hidden_layers else None
        if hidden is not None and packed is not None:
            hidden = _unpack(hidden[:, 0].transpose(0, 1), packed, batch * width).transpose(0, 1).unflatten(1, (batch, width))
        if hidden is not None and hidden_rows is not None:
            hidden = hidden.flatten(1, 2)[:, hidden_rows]
        if not logits:
            return None, hidden
        out = self.hf.lm_head(x)
        if packed is not None:
            out = _unpack(out[0], packed, batch * width).unflatten(0, (batch, width))
        return out, hidden

    def _attention(self, index, layer, x, cos, sin, pages_at, offsets, block_table, mask, layout):
        attn = layer.self_attn
        batch, width, packed = layout
        dim = attn.head_dim
        rows, tokens = x.shape[:2]  # [B, T], or [1, N] packed
        q = attn.q_proj(x).view(rows, tokens, -1, dim).transpose(1, 2)
        k = attn.k_proj(x).view(rows, tokens, -1, dim).transpose(1, 2)
        v = attn.v_proj(x).view(rows, tokens, -1, dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys, values = self.kv.keys[index], self.kv.values[index]  # [pages + 1, kv_heads, page, dim]
        # write in place: [B, T] page and offset indices select [B, T, kv_heads, dim] slots
        keys[pages_at, :, offsets] = k.transpose(1, 2).to(keys.dtype)
        values[pages_at, :, offsets] = v.transpose(1, 2).to(values.dtype)
        heads = keys.shape[1]
        if packed is not None:  # the queries back in their [B, T] places, padding zero
            q = _unpack(q[0].transpose(0, 1), packed, batch * width).view(batch, width, -1, dim).transpose(1, 2)
        # this row's pages in order: [B, P, kv_heads, page, dim] -> [B, kv_heads, P * page, dim]
        k_all = keys[block_table].permute(0, 2, 1, 3, 4).reshape(batch, heads, -1, dim)
        v_all = values[block_table].permute(0, 2, 1, 3, 4).reshape(batch, heads, -1, dim)
        out = F.scaled_dot_product_attention(q, k_all.to(q.dtype), v_all.to(q.dtype), attn_mask=mask,
                                             scale=attn.scaling, enable_gqa=True)
        out = out.transpose(1, 2).reshape(batch, width, -1)
        if packed is not None:
            out = out.flatten(0, 1)[packed][None]
        return attn.o_proj(out)


def _unpack(rows: torch.Tensor, packed: torch.Tensor, size: int) -> torch.Tensor:
    """``rows`` [N, ...] of a packed batch into ``size`` flat places (b * T + t), zeros elsewhere."""
    out = rows.new_zeros((size, *rows.shape[1:]))
    out[packed] = rows
    return out
