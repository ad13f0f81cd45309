"""Batched generation: order, batching invariance, eos handling, sampling determinism."""

from __future__ import annotations

import pytest
import torch

from upq.generation import generate, generate_ids, render_prompt

PROMPTS = [
    "hi",
    "What is two plus two? Explain it at some length please.",
    "list three fruits",
    "Write a short poem about the sea and the sky.",
    "ok",
]


def test_render_prompt_uses_chat_template(tiny_model):
    _, tok = tiny_model
    ids = render_prompt(tok, "hello", chat=True)
    text = tok.decode(ids)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tok, "hello", chat=False) == tok("hello")["input_ids"]


def test_batched_greedy_matches_one_by_one(tiny_model):
    model, tok = tiny_model
    batched = generate_ids(model, tok, PROMPTS, max_new_tokens=6, batch_size=2, progress=False)
    single = [generate_ids(model, tok, [p], max_new_tokens=6, progress=False)[0] for p in PROMPTS]
    assert [g.response_ids for g in batched] == [g.response_ids for g in single]
    for p, g in zip(PROMPTS, batched):  # original order preserved
        assert g.prompt_ids == render_prompt(tok, p)
        assert len(g.response_ids) <= 6
    texts = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=3, progress=False)
    assert len(texts) == len(PROMPTS) and all(isinstance(t, str) for t in texts)


def test_stops_at_eos(tiny_model):
    model, tok = tiny_model
    eos = tok.eos_token_id
    decode_steps = {"n": 0}

    def count_decode_steps(module, args, kwargs):
        if kwargs["input_ids"].shape[1] == 1:  # prompts are longer than one token
            decode_steps["n"] += 1

    def force_eos_from_second_step(module, inputs, output):
        if decode_steps["n"] >= 2:  # the prefill token and the first decoded one are free
            output[..., eos] = 1e4
        return output

    spy = model.model.register_forward_pre_hook(count_decode_steps, with_kwargs=True)
    handle = model.lm_head.register_forward_hook(force_eos_from_second_step)
    try:
        gens = generate_ids(model, tok, PROMPTS[:3], max_new_tokens=20, batch_size=3,
                            progress=False, engine="upq")  # the hooks see transformers' forward
    finally:
        handle.remove()
        spy.remove()
    for g in gens:
        assert g.finished and g.response_ids[-1] == eos
        assert len(g.response_ids) == 3 and eos not in g.response_ids[:-1]


def test_sampling_is_seeded(tiny_model):
    model, tok = tiny_model
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, progress=False)
    a = generate(model, tok, PROMPTS, seed=3, **kw)
    b = generate(model, tok, PROMPTS, seed=3, **kw)
    assert a == b


def test_errors(tiny_model):
    model, tok = tiny_model
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tok, ["x"], temperature=-1, progress=False)
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        generate(model, tok, ["x"], progress=False)
    assert len(generate(model, tok, ["x"], chat=False, max_new_tokens=2, progress=False)) == 1


MANY_PROMPTS = [f"{p} (variant {k})" * (1 + k % 3) for k, p in enumerate(PROMPTS * 3)]


def _stop_on_multiples(model, eos: int, every: int = 4):
    """Make eos the top token whenever the current argmax id is a multiple of ``every``.

    Rows then stop at different, content-dependent steps, identically for any decoding engine.
    """

    def hook(module, inputs, output):
        top = output.argmax(dim=-1, keepdim=True)
        forced = output.max(dim=-1, keepdim=True).values + 1.0
        stop = (top % every == 0) & (top != eos)
        return output.scatter(-1, torch.full_like(top, eos),
                              torch.where(stop, forced, output.gather(-1, torch.full_like(top, eos))))

    return model.lm_head.register_forward_hook(hook)


def _hf_greedy(model, tok, prompt: str, max_new_tokens: int) -> list[int]:
    """The oracle: ``model.generate`` on one unpadded prompt, cut after the first eos."""
    ids = torch.tensor([render_prompt(tok, prompt)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    return out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out


@pytest.mark.parametrize("small_cache", [False, True])
def test_continuous_batching_matches_hf_generate(tiny_model, monkeypatch, small_cache):
    """Rows that stop early are refilled, and every response equals HF generate's, one prompt at a time.

    ``small_cache`` starts the slot cache with one column and one spare, so it is regrown and
    compacted on almost every step.
    """
    import upq.generation as generation
    from upq.kv_slots import SlotKVCache

    model, tok = tiny_model
    model = model.double()
    if small_cache:
        monkeypatch.setattr(generation, "SlotKVCache", lambda slots, capacity: SlotKVCache(slots, 1, spare=1))
    handle = _stop_on_multiples(model, tok.eos_token_id)
    prefill_rows: list[int] = []
    spy = model.model.register_forward_pre_hook(
        lambda m, args, kwargs: prefill_rows.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    try:
        gens = generate_ids(model, tok, MANY_PROMPTS, max_new_tokens=12, batch_size=4, progress=False,
                            engine="upq")
        spy.remove()
        expected = [_hf_greedy(model, tok, p, 12) for p in MANY_PROMPTS]
    finally:
        handle.remove()
    assert [g.response_ids for g in gens] == expected
    lengths = {len(g.response_ids) for g in gens}
    assert len(lengths) > 2 and any(g.finished for g in gens) and any(not g.finished for g in gens)
    assert len(prefill_rows) > 1 and sum(prefill_rows) == len(MANY_PROMPTS)  # refills happened
    for g, p in zip(gens, MANY_PROMPTS):
        assert g.prompt_ids == render_prompt(tok, p)
        assert g.finished == (g.response_ids[-1] == tok.eos_token_id)


def test_pick_tokens():
    from upq.generation import pick_tokens

    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.9]])
    assert pick_tokens(logits, 0.0, 1.0, None).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    # a nucleus that only holds the top token is greedy, whatever the temperature
    assert pick_tokens(logits, 5.0, 1e-6, g).tolist() == [1, 0]
    draws = torch.stack([pick_tokens(logits, 1.0, 1.0, g) for _ in range(400)])
    assert set(draws[:, 1].tolist()) >= {0, 2}  # sampling reaches more than the argmax
    assert (draws[:, 0] == 1).float().mean() > 0.6


def test_generate_ids_edge_cases(tiny_model):
    model, tok = tiny_model
    assert generate_ids(model, tok, [], progress=False) == []
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_ids(model, tok, ["x"], max_new_tokens=0, progress=False)
    (one,) = generate_ids(model, tok, ["x"], max_new_tokens=1, batch_size=64, progress=False)
    assert len(one.response_ids) == 1
