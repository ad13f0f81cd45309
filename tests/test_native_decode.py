"""The native Llama decoder against the transformers forward: logits, greedy tokens, cache bounds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import upq
from upq.generation import generate_ids
from upq.interactive import SamplingSettings, encode_chat, resolve_engine, stream_generate
from upq.native_decode import NativeDecoder, native_decode_reason, native_decoder

from conftest import build_tiny_model

pytestmark = pytest.mark.skipif(upq.kernels.load_native() is None, reason="native kernel unavailable")


def _all_logits(decoder: NativeDecoder, ids: list[int], slot: int = 0) -> torch.Tensor:
    n = len(ids)
    return decoder.forward(ids, [slot] * n, list(range(n)), list(range(n)))


def test_float_model_logits_match_transformers(tiny_model) -> None:
    model, _ = tiny_model
    ids = torch.randint(3, 300, (1, 17))
    with torch.no_grad():
        reference = model(ids).logits[0]
    decoder = NativeDecoder(model)
    decoder.reset(slots=3, capacity=32)
    torch.testing.assert_close(_all_logits(decoder, ids[0].tolist(), slot=2), reference, atol=1e-4, rtol=1e-4)
    # token by token in slot 0, interleaved with an unrelated sequence in slot 1
    other = torch.randint(3, 300, (17,)).tolist()
    stepped = []
    for t in range(17):
        out = decoder.forward([ids[0, t].item(), other[t]], [0, 1], [t, t], [0, 1])
        stepped.append(out[0])
    torch.testing.assert_close(torch.stack(stepped), reference, atol=1e-4, rtol=1e-4)


@pytest.fixture
def packed_model(tiny_model_dir: Path, tmp_path: Path):
    """The tiny model with INT2 SEQ g32 layers and an asym INT4 g32 head (untied), packed."""
    out = upq.quantize(str(tiny_model_dir), recipe="rtn-int2", out=tmp_path / "int2", add_stages=["lm-head"],
                       overrides={"rtn.group_size": 32, "lm-head.group_size": 32})
    return upq.load(out), out


def test_packed_model_matches_the_transformers_path(packed_model, tiny_model) -> None:
    model, _ = packed_model
    _, tokenizer = tiny_model
    ids = torch.randint(3, 300, (1, 21))
    with torch.no_grad():
        reference = model(ids).logits[0]  # PackedLinear layers on the native kernel
    decoder = native_decoder(model)
    assert decoder is native_decoder(model)  # built once per model
    decoder.reset(1, 40)
    native = _all_logits(decoder, ids[0].tolist())
    assert (native - reference).abs().max() <= 1e-4 * reference.abs().max()
    prompt = encode_chat(tokenizer, [{"role": "user", "content": "Write a short poem about the sea."}])
    settings = SamplingSettings(max_new_tokens=24, min_new_tokens=24)
    native_ids, _ = stream_generate(model, tokenizer, prompt, settings, engine="native")
    upq_ids, _ = stream_generate(model, tokenizer, prompt, settings, engine="upq")
    assert native_ids == upq_ids and len(native_ids) == 24


def test_cache_bounds_and_reserve(tiny_model) -> None:
    model, _ = tiny_model
    ids = torch.randint(3, 300, (12,)).tolist()
    decoder = NativeDecoder(model)
    with pytest.raises(RuntimeError, match="reset"):
        decoder.forward([5], [0], [0], [0])
    decoder.reset(slots=2, capacity=8)
    assert (decoder.slots, decoder.capacity) == (2, 8)
    first = _all_logits(decoder, ids[:8])
    with pytest.raises(RuntimeError, match="outside the cache of 8 positions"):
        decoder.forward([ids[8]], [0], [8], [0])
    with pytest.raises(RuntimeError, match="slot 2 outside the 2 slots"):
        decoder.forward([ids[0]], [2], [0], [0])
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        decoder.forward([10**6], [0], [0], [0])
    with pytest.raises(RuntimeError, match="logit row 1 outside"):
        decoder.forward([ids[0]], [1], [0], [1])
    with pytest.raises(RuntimeError, match="position 3 of slot 1 skips uncached positions \\(the slot holds 0\\)"):
        decoder.forward([ids[0]], [1], [3], [0])
    decoder.reserve(16)  # keeps the 8 cached positions
    rest = decoder.forward(ids[8:], [0] * 4, list(range(8, 12)), list(range(4)))
    decoder.reset(1, 12)
    whole = _all_logits(decoder, ids)
    torch.testing.assert_close(torch.cat([first, rest]), whole, atol=1e-5, rtol=1e-5)
    # writing position 5 again rewinds the slot: 5.. are recomputed, 9.. must be written again
    other = decoder.forward([7, 8], [0, 0], [5, 6], [0, 1])
    with pytest.raises(RuntimeError, match="position 8 of slot 0 skips"):
        decoder.forward([9], [0], [8], [0])
    again = decoder.forward(ids[5:], [0] * 7, list(range(5, 12)), list(range(7)))
    torch.testing.assert_close(again, whole[5:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other[1], whole[6])


def test_unsupported_models_fall_back_to_transformers(tiny_model) -> None:
    model, _ = tiny_model
    assert native_decode_reason(model) is None and resolve_engine(model, "auto") == "native"
    model.train()
    assert "training" in native_decode_reason(model)
    model.eval()
    model.double()
    assert "float64" in native_decode_reason(model)
    assert resolve_engine(model, "auto") == "upq"
    with pytest.raises(ValueError, match="cannot run this model: the model is float64"):
        resolve_engine(model, "native")
    gelu = build_tiny_model(320)
    gelu.config.hidden_act = "gelu"
    assert "activation 'gelu'" in native_decode_reason(gelu)
    odd = build_tiny_model(320)
    odd.model.layers[1].mlp.down_proj = nn.Sequential(nn.Linear(128, 64))
    assert "layers.1.mlp.down_proj is a Sequential" in native_decode_reason(odd)
    partial = build_tiny_model(320)
    partial.model.rotary_emb.inv_freq = partial.model.rotary_emb.inv_freq[:4]
    assert "partial rotary" in native_decode_reason(partial)
    with pytest.raises(ValueError, match="engine must be one of"):
        resolve_engine(model, "fast")


MANY_PROMPTS = [f"Prompt {k}: " + "tell me about the sea " * (1 + k % 4) for k in range(11)]


def test_continuous_batching_matches_one_prompt_at_a_time(tiny_model, monkeypatch) -> None:
    """Slots that stop early (eos forced on content-dependent steps) take the next prompts, and
    every response equals the native decoder's own one-prompt-at-a-time greedy answer and the
    transformers engine's."""
    model, tokenizer = tiny_model
    eos = tokenizer.eos_token_id
    forward = NativeDecoder.forward

    prefills: list[int] = []  # slots filled by each forward that carries prompts

    def stop_on_multiples(self, tokens, slots, positions, logit_rows):
        if len(tokens) > len(set(slots)):
            prefills.append(len(set(slots)))
        logits = forward(self, tokens, slots, positions, logit_rows)
        stop = logits.argmax(-1) % 4 == 0
        logits[stop, eos] = logits[stop].max(-1).values + 1
        return logits

    monkeypatch.setattr(NativeDecoder, "forward", stop_on_multiples)
    batched = generate_ids(model, tokenizer, MANY_PROMPTS, max_new_tokens=10, batch_size=4, progress=False,
                           engine="native")
    single = [generate_ids(model, tokenizer, [p], max_new_tokens=10, progress=False, engine="native")[0]
              for p in MANY_PROMPTS]
    assert [g.response_ids for g in batched] == [g.response_ids for g in single]
    assert len({len(g.response_ids) for g in batched}) > 1 and any(g.finished for g in batched)
    assert sum(prefills[:-len(MANY_PROMPTS)]) == len(MANY_PROMPTS)  # the batched run's refills ...
    assert len(prefills) - len(MANY_PROMPTS) > 1  # ... came in several forwards, while other slots decoded
    assert all(g.finished == (g.response_ids[-1] == eos) for g in batched)


def test_native_and_transformers_engines_agree_on_batches(tiny_model) -> None:
    model, tokenizer = tiny_model
    native = generate_ids(model, tokenizer, MANY_PROMPTS, max_new_tokens=8, batch_size=3, progress=False,
                          engine="native")
    reference = generate_ids(model, tokenizer, MANY_PROMPTS, max_new_tokens=8, batch_size=3, progress=False,
                             engine="upq")
    assert [g.response_ids for g in native] == [g.response_ids for g in reference]


@pytest.mark.real_model
def test_bundled_model_greedy_tokens_equal_transformers() -> None:
    from upq.loading import load_any

    model, tokenizer = load_any(None)
    prompt = encode_chat(tokenizer, [{"role": "user", "content": "Describe the colours of a sunset in two sentences."}])
    settings = SamplingSettings(max_new_tokens=32, min_new_tokens=32)
    native_ids, _ = stream_generate(model, tokenizer, prompt, settings, engine="native")
    upq_ids, _ = stream_generate(model, tokenizer, prompt, settings, engine="upq")
    assert native_ids == upq_ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,features,batch", [(37, 576, 1), (64, 35, 3), (9, 1000, 6), (5, 32, 4)])
def test_dense_gemv_matches_matmul(dtype, rows, features, batch) -> None:
    gemv = upq.kernels.load_native().dense_gemv
    torch.manual_seed(rows)
    w, x, bias = torch.randn(rows, features).to(dtype), torch.randn(batch, features), torch.randn(rows)
    expected = x @ w.float().t()
    torch.testing.assert_close(gemv(x, w), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gemv(x, w, bias), expected + bias, atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="features"):
        gemv(x[:, 1:], w)


def test_bfloat16_valued_weights_are_read_as_bfloat16(tiny_model) -> None:
    """A float head whose values are all bfloat16 (as a upq checkpoint stores them) is streamed in
    half the bytes with the float32 model's logits; other weights stay float32, shared."""
    from upq.native_decode import _dense_weight

    model, _ = tiny_model
    exact = model.lm_head.weight.detach().to(torch.bfloat16).float()
    assert _dense_weight(exact).dtype == torch.bfloat16
    assert _dense_weight(model.lm_head.weight).data_ptr() == model.lm_head.weight.data_ptr()  # not copied
    with torch.no_grad():
        model.lm_head.weight.copy_(exact)
        ids = torch.randint(3, 300, (1, 20))  # 20 logit rows: past the decode batch of 16, still streamed
        reference = model(ids).logits[0]
    decoder = NativeDecoder(model)
    decoder.reset(1, 20)
    torch.testing.assert_close(_all_logits(decoder, ids[0].tolist()), reference, atol=1e-4, rtol=1e-4)
