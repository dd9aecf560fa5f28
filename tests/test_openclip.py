"""OpenCLIP text tower ↔ `CLIPTextModelWithProjection`: key mapping, and the same numbers as open_clip's own math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gcfg_core.configs import SDXL, SDXL_TINY
from gcfg_core.openclip import (
    LOGIT_SCALE_INIT,
    OpenCLIPLayoutError,
    build_openclip_text_encoder,
    hf_to_openclip,
    infer_openclip_config,
    openclip_to_hf,
)

CONFIG = SDXL_TINY.text_encoder_2


def random_openclip_state(seed=0, config=CONFIG) -> dict[str, torch.Tensor]:
    """An open_clip text tower state dict (the keys of `open_clip.CLIP` without its visual tower)."""
    g = torch.Generator().manual_seed(seed)
    w, m = config.width, config.mlp_width
    rnd = lambda *shape, scale=0.05: torch.randn(*shape, generator=g) * scale  # noqa: E731
    state = {"token_embedding.weight": rnd(config.vocab_size, w, scale=0.5),
             "positional_embedding": rnd(config.context_length, w, scale=0.1),
             "ln_final.weight": 1 + rnd(w), "ln_final.bias": rnd(w),
             "text_projection": rnd(w, config.embed_dim, scale=w**-0.5), "logit_scale": torch.tensor(2.0)}
    for i in range(config.layers):
        p = f"transformer.resblocks.{i}."
        state.update({p + "ln_1.weight": 1 + rnd(w), p + "ln_1.bias": rnd(w),
                      p + "attn.in_proj_weight": rnd(3 * w, w, scale=w**-0.5), p + "attn.in_proj_bias": rnd(3 * w),
                      p + "attn.out_proj.weight": rnd(w, w, scale=w**-0.5), p + "attn.out_proj.bias": rnd(w),
                      p + "ln_2.weight": 1 + rnd(w), p + "ln_2.bias": rnd(w),
                      p + "mlp.c_fc.weight": rnd(m, w, scale=w**-0.5), p + "mlp.c_fc.bias": rnd(m),
                      p + "mlp.c_proj.weight": rnd(w, m, scale=m**-0.5), p + "mlp.c_proj.bias": rnd(w)})
    return state


def openclip_reference(state, tokens, config=CONFIG):
    """(penultimate hidden state, pooled projection) the way open_clip's CLIP and sgm's FrozenOpenCLIPEmbedder2
    compute them: packed multi-head attention (torch's own), causal mask, exact GELU, ln_final, EOS = argmax token."""
    w = config.width
    x = state["token_embedding.weight"][tokens] + state["positional_embedding"]
    length = tokens.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1)
    penultimate = None
    for i in range(config.layers):
        if i == config.layers - 1:
            penultimate = x
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (w,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        attn, _ = F.multi_head_attention_forward(
            h.transpose(0, 1), h.transpose(0, 1), h.transpose(0, 1), w, config.heads,
            state[p + "attn.in_proj_weight"], state[p + "attn.in_proj_bias"], None, None, False, 0.0,
            state[p + "attn.out_proj.weight"], state[p + "attn.out_proj.bias"], training=False, attn_mask=mask,
            need_weights=False)
        x = x + attn.transpose(0, 1)
        h = F.layer_norm(x, (w,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])),
                         state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
    last = F.layer_norm(x, (w,), state["ln_final.weight"], state["ln_final.bias"])
    pooled = last[torch.arange(tokens.shape[0]), tokens.argmax(dim=-1)] @ state["text_projection"]
    return penultimate, pooled


def test_key_mapping_splits_in_proj_transposes_the_projection_and_round_trips():
    state = random_openclip_state()
    hf = openclip_to_hf(state)
    w = CONFIG.width
    packed = state["transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(hf["text_model.encoder.layers.1.self_attn.k_proj.weight"], packed[w:2 * w])
    assert torch.equal(hf["text_projection.weight"], state["text_projection"].t())
    assert "logit_scale" not in str(list(hf))
    back = hf_to_openclip(hf)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[key], state[key]) for key in state if key != "logit_scale")
    assert back["logit_scale"].item() == pytest.approx(LOGIT_SCALE_INIT)


def test_unknown_keys_are_named():
    with pytest.raises(OpenCLIPLayoutError, match="visual.conv1.weight"):
        openclip_to_hf({**random_openclip_state(), "visual.conv1.weight": torch.zeros(1)})


def test_config_is_read_from_shapes():
    assert infer_openclip_config(random_openclip_state()) == CONFIG
    big = {"token_embedding.weight": torch.empty(49408, 1280, device="meta"),
           "positional_embedding": torch.empty(77, 1280, device="meta"),
           "text_projection": torch.empty(1280, 1280, device="meta"),
           **{f"transformer.resblocks.{i}.ln_1.weight": torch.empty(1280, device="meta") for i in range(32)},
           "transformer.resblocks.0.mlp.c_fc.weight": torch.empty(5120, 1280, device="meta")}
    assert infer_openclip_config(big) == SDXL.text_encoder_2


@torch.no_grad()
def test_converted_model_computes_open_clips_penultimate_state_and_pooled_projection():
    state = random_openclip_state(seed=3)
    model = build_openclip_text_encoder(CONFIG, openclip_to_hf(state))
    # BOS, a few tokens, EOS, then open_clip's 0 padding; a second row with EOS later.
    tokens = torch.zeros(2, 77, dtype=torch.int64)
    tokens[0, :5] = torch.tensor([49406, 320, 1125, 539, 49407])
    tokens[1, :9] = torch.tensor([49406, 320, 1125, 539, 320, 2368, 267, 4, 49407])
    out = model(input_ids=tokens, output_hidden_states=True)
    penultimate, pooled = openclip_reference(state, tokens)
    assert torch.allclose(out.hidden_states[-2], penultimate, atol=1e-5)
    assert torch.allclose(out.text_embeds, pooled, atol=1e-5)
