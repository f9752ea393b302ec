"""ReAGent: algorithm facts, exactness of batched/speculative execution, robustness cases, samplers,
metrics and baselines. Hand-built exact models (tests/reagent_models.py) and the tiny random Llama."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from freeshap_ray.config import ReagentConfig, reagent_config_from_dict
from freeshap_ray.errors import ConfigError
from freeshap_ray.reagent import (
    ReagentEngine,
    ReagentRunner,
    Target,
    TargetLM,
    UniformSampler,
    baseline_scores,
    heatmap_html,
    prepare_prompt,
    soft_faithfulness,
    special_token_ids,
    valid_token_ids,
)
from freeshap_ray.reagent.algorithm import probe_rng
from freeshap_ray.reagent.api import reagent_attribute

from .reagent_models import OnePositionLM, tiny_tokenizer

J = 3  # the position the hand-built model reads


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny forwards are overhead-bound; extra intra-op threads only contend on the shared 2 cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_llama():
    from freeshap_ray.models import load_lm, resolve_model_path

    lm = load_lm(resolve_model_path("tiny:llama"))
    torch.manual_seed(0)
    return lm.model, lm.tokenizer


def _one_pos(tok, **kw):
    return OnePositionLM(len(tok), J, **kw)


def _context(tok, text="the movie was great and the music was very good"):
    return np.asarray(tok(text)["input_ids"], dtype=np.int64)  # starts with <s> (special)


def _engine(model, tok, cfg):
    return ReagentEngine(TargetLM(model, batch_rows=cfg.batch_rows, pad_id=tok.pad_token_id),
                         UniformSampler(valid_token_ids(model, tok)), cfg, special_token_ids(tok))


def reference_reagent(model, tok, target: Target, cfg: ReagentConfig, vocab_size: int):
    """Straight transcription of the algorithm, sharing nothing with the engine: its own random stream, top-n
    choice and replacements; one probe, one step, one batch-1 forward at a time.

    What the engine and this loop agree on is the DEFINITION of a probe's randomness: NumPy's default generator
    seeded with (seed, prompt id, target position, probe) draws L uniforms for the initial logits, then per step
    three blocks of L (one per replaceable position): which positions to replace (u < replacing ratio), their
    replacements for the update, and their replacements for the stop check; a replacement is
    ``pool[floor(u · |pool|)]`` with ``pool`` the sorted non-special ids below the vocabulary size; the kept
    top n are the largest logits, ties to the lower position. So the results must agree bit for bit.
    """
    special = {int(i) for i in tok.all_special_ids}
    special |= {int(i) for i, t in tok.added_tokens_decoder.items() if t.special}
    pool = [i for i in range(vocab_size) if i not in special]
    ctx = [int(t) for t in target.context]
    pos = [k for k, t in enumerate(ctx) if t not in special]
    L = len(pos)
    n = min(cfg.keep_top_n, L - 1)

    def with_replacements(chosen: list[bool], u: np.ndarray) -> np.ndarray:
        row = list(ctx)
        for k, p in enumerate(pos):
            if chosen[k]:
                row[p] = pool[min(int(u[k] * len(pool)), len(pool) - 1)]
        return np.array(row, dtype=np.int64)

    def stats(row):
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(row)[None]).logits[0, -1].float()
        return float(torch.softmax(logits, -1)[target.target_id]), int((logits > logits[target.target_id]).sum())

    zs, steps, conv = [], [], []
    for q in range(cfg.num_probes):
        rng = np.random.default_rng([cfg.seed, target.prompt_id, target.position, q])
        z = rng.random(L)
        seen = [False] * L
        done = False
        for step in range(1, cfg.max_steps + 1):
            u_mask, u_rep, u_stop = rng.random(L), rng.random(L), rng.random(L)
            chosen = [bool(u < cfg.replacing_ratio) for u in u_mask]
            d = target.p_orig - stats(with_replacements(chosen, u_rep))[0] if any(chosen) else 0.0
            a = np.clip((1 + np.array([d])) / 2, 1e-7, 1 - 1e-7)
            up = (np.log(a) - np.log1p(-a))[0]
            z = z + np.array([up if c else -up for c in chosen])
            seen = [s or c for s, c in zip(seen, chosen)]
            if L <= cfg.keep_top_n and not all(seen):
                continue
            top = set(sorted(range(L), key=lambda k: (-z[k], k))[:n])
            if stats(with_replacements([k not in top for k in range(L)], u_stop))[1] < cfg.top_k:
                done = True
                break
        zs.append(z)
        steps.append(step)
        conv.append(done)
    s = np.exp(zs - np.max(zs, axis=1, keepdims=True))
    s /= s.sum(axis=1, keepdims=True)
    conv = np.array(conv)
    scores = np.zeros(len(ctx))
    scores[pos] = s[conv].mean(0) if conv.any() else s.mean(0)
    return scores, np.array(steps), conv


# ----------------------------------------------------------------------------------------------
# The algorithm


def test_random_stream_blocks_equal_sequential_draws():
    a, b = probe_rng(3, 1, 7, 2), probe_rng(3, 1, 7, 2)
    block = a.random((4, 3, 5))
    seq = np.stack([np.stack([b.random(5) for _ in range(3)]) for _ in range(4)])
    assert np.array_equal(block, seq)


def test_target_depending_on_one_position_gets_highest_importance(tok):
    model = _one_pos(tok)
    ctx = _context(tok)
    cfg = ReagentConfig(num_probes=8, max_steps=300)
    y = model.target_for(int(ctx[J]))
    [res] = _engine(model, tok, cfg).run([Target(ctx, y)])
    assert res.converged and res.probes_converged == 8
    assert int(np.argmax(res.scores)) == J
    assert res.scores[0] == 0.0  # <s> is special
    assert np.isclose(res.scores.sum(), 1.0)


@pytest.mark.parametrize("spec", [dict(speculative_steps=1), dict(speculative_steps=8, speculative_growth=1.0),
                                  dict(speculative_steps=4, speculative_growth=0.25),
                                  dict(speculative_steps=5, speculative_growth=0.0, batch_rows=7)])
def test_batched_speculative_equals_sequential_exactly(tok, spec):
    """Also covers pipelining (a finishing block's stop rows sent with the next block's update rows) and
    probes that never stop (the last target is never in the model's top 3)."""
    model = _one_pos(tok)
    base = ReagentConfig(num_probes=6, max_steps=60, keep_top_n=3, seed=11)
    contexts = [_context(tok), _context(tok, "i loved it so much"), _context(tok, "i loved it")]
    targets = lambda: [Target(c, model.target_for(int(c[min(J, len(c) - 1)])), prompt_id=k) for k, c in enumerate(contexts)] + [  # noqa: E731
        Target(contexts[1], 2 + len(tok) // 2, prompt_id=3)]
    seq = _engine(model, tok, base).run(targets(), schedule="sequential")
    bat = _engine(model, tok, dataclasses.replace(base, **spec)).run(targets(), schedule="batched")
    for t, a, b in zip(targets(), seq, bat):
        assert np.array_equal(a.scores, b.scores)
        assert np.array_equal(a.steps, b.steps) and np.array_equal(a.probe_converged, b.probe_converged)
        t.p_orig = a.p_orig
        ref_scores, ref_steps, ref_conv = reference_reagent(model, tok, t, base, len(tok))
        assert np.array_equal(ref_scores, a.scores)
        assert np.array_equal(ref_steps, a.steps) and np.array_equal(ref_conv, a.probe_converged)


def test_batched_equals_sequential_on_tiny_llama(tiny_llama):
    model, tok = tiny_llama
    kw = dict(max_new_tokens=2, num_probes=4, max_steps=15, keep_top_n=2)
    a = reagent_attribute(model, tok, "the movie was really great and i loved the music", schedule="sequential", **kw)
    b = reagent_attribute(model, tok, "the movie was really great and i loved the music", speculative_steps=6,
                          speculative_growth=1.0, **kw)
    assert [list(r.steps) for r in a.results] == [list(r.steps) for r in b.results]
    assert np.allclose(a.attributions.score, b.attributions.score, rtol=0, atol=1e-6)


def _derived_rows(base_seqs, vocab, n_rows, seed):
    """Rows as ReAGent makes them: prefixes of a base with ~30 % of the tokens replaced (some untouched,
    some one token longer than the base, some repeated)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n_rows):
        b = base_seqs[k % len(base_seqs)]
        n = int(rng.integers(2, len(b) + 2))
        row = np.concatenate([b, rng.integers(5, vocab, 1)])[:n].copy()
        if k % 5:
            m = rng.random(n) < 0.3
            row[m] = rng.integers(5, vocab, int(m.sum()))
        rows.append(row)
    rows += rows[:4]  # exact repeats
    return rows


def test_packed_prefix_path_matches_plain_path(tiny_llama):
    model, tok = tiny_llama
    V = model.config.vocab_size
    rng = np.random.default_rng(5)
    bases = [rng.integers(5, V, 11), rng.integers(5, V, 6)]
    rows = _derived_rows(bases, V, 60, seed=6)
    ys = np.random.default_rng(7).integers(5, V, len(rows))
    ys[-4:] = ys[:4]
    plain = TargetLM(model, packed=False, memo=False)
    p0, r0 = plain.target_stats(rows, ys)
    packed = TargetLM(model, batch_rows=16)
    assert packed.packed is not None and packed.packed_reason is None
    packed.set_bases(bases)
    assert packed.packed is not None and packed.packed.verified  # passed its self-check
    computed0 = packed.stats.computed
    p1, r1 = packed.target_stats(rows, ys)
    assert np.allclose(p1, p0, rtol=1e-5, atol=1e-7) and np.array_equal(r1, r0)
    assert packed.stats.memo_hits == 4  # the repeated rows were not evaluated again
    assert packed.stats.computed - computed0 < 0.75 * sum(len(r) for r in rows[:-4])  # stored prefixes were reused
    # storing every computed token (not only the first store_depth of a row), a second pass finds every
    # prefix stored: only each row's last token is computed
    again = TargetLM(model, memo=False)
    again.packed.store_depth = 10**6
    again.set_bases(bases)
    again.target_stats(rows, ys)
    c = again.stats.computed
    p2, r2 = again.target_stats(rows, ys)
    assert again.stats.computed - c == len(rows)
    assert np.allclose(p2, p0, rtol=1e-5, atol=1e-7) and np.array_equal(r2, r0)
    # no room to store anything: still right
    tiny = TargetLM(model, max_cache_mb=0)
    tiny.set_bases(bases)
    p3, r3 = tiny.target_stats(rows, ys)
    assert np.allclose(p3, p0, rtol=1e-5, atol=1e-7) and np.array_equal(r3, r0)


def test_packed_path_self_check_falls_back_to_plain(tiny_llama, monkeypatch):
    model, tok = tiny_llama
    lm = TargetLM(model)
    real = lm.packed.last_logits

    def wrong(rows, **kw):
        logits, n = real(rows, **kw)
        return logits + torch.linspace(0, 1, logits.shape[1]), n

    monkeypatch.setattr(lm.packed, "last_logits", wrong)
    lm.set_bases([np.arange(5, 12)])
    assert lm.packed is None and "self-check" in lm.packed_reason
    with pytest.raises(ValueError, match="packed"):
        TargetLM(_one_pos(tok), packed=True)  # not a Hugging Face model
    assert TargetLM(_one_pos(tok)).packed is None


def test_engine_same_results_on_packed_and_plain_paths(tiny_llama):
    model, tok = tiny_llama
    kw = dict(max_new_tokens=3, num_probes=6, max_steps=25, keep_top_n=3, speculative_steps=4)
    prompts = ["the movie was really great and i loved the music", "a wonderful story"]
    a = reagent_attribute(model, tok, prompts, packed=False, **kw)
    b = reagent_attribute(model, tok, prompts, **kw)
    assert not a.stats["packed_forward"] and b.stats["packed_forward"]
    assert [list(r.steps) for r in a.results] == [list(r.steps) for r in b.results]
    assert np.allclose(a.attributions.score, b.attributions.score, rtol=0, atol=1e-6)
    assert b.stats["forward_tokens"] < 0.8 * a.stats["forward_tokens"]


def test_memo_and_length_chunks_keep_results_bit_for_bit(tok):
    from freeshap_ray.reagent.lm import _length_chunks

    model = _one_pos(tok)
    cfg = ReagentConfig(num_probes=6, max_steps=40, keep_top_n=2, seed=3, speculative_steps=4)
    contexts = [_context(tok, "i loved it"), _context(tok, "the movie was great and the music was very good"),
                _context(tok, "a fine film")]
    never = 2 + len(tok) // 2  # never in the model's top 3: its probes run to max_steps and repeat rows
    targets = lambda: [Target(c, model.target_for(int(c[min(J, len(c) - 1)])), prompt_id=k) for k, c in enumerate(contexts)] + [  # noqa: E731
        Target(contexts[0], never, prompt_id=7)]
    sampler = UniformSampler(valid_token_ids(model, tok))
    runs = []
    for memo in (False, True):
        lm = TargetLM(model, batch_rows=cfg.batch_rows, pad_id=tok.pad_token_id, memo=memo)
        runs.append((ReagentEngine(lm, sampler, cfg, special_token_ids(tok)).run(targets()), lm.stats))
    (a, sa), (b, sb) = runs
    assert sb.memo_hits > 0 and sb.rows < sa.rows
    for x, y in zip(a, b):
        assert np.array_equal(x.scores, y.scores) and np.array_equal(x.steps, y.steps)
    lengths = np.array([9] * 10 + [8] * 3 + [5] * 20 + [2])
    chunks = _length_chunks(lengths, batch_rows=16)
    assert sorted(np.concatenate(chunks).tolist()) == list(range(len(lengths)))
    assert all(len(c) <= 16 for c in chunks)
    widths = [(lengths[c].max(), lengths[c].sum(), len(c)) for c in chunks]
    assert all(w * n - real <= 0.125 * w * n or n <= 8 for w, real, n in widths)


def test_no_probe_converges_gives_finite_mean_and_flag(tok):
    model = _one_pos(tok, scale=100.0)  # p(y) saturates at 1: exercises the clipped logit update
    ctx = _context(tok)
    never = 2 + len(tok) // 2  # mid-vocabulary id: never a target of the model, never in its top 3
    cfg = ReagentConfig(num_probes=4, max_steps=12)
    res_never, res_sat = _engine(model, tok, cfg).run([Target(ctx, never), Target(ctx, model.target_for(int(ctx[J])), position=99)])
    assert not res_never.converged and res_never.probes_converged == 0
    assert np.all(res_never.steps == 12)
    assert np.all(np.isfinite(res_never.scores)) and np.isclose(res_never.scores.sum(), 1.0)
    assert np.all(np.isfinite(res_sat.scores)) and int(np.argmax(res_sat.scores)) == J


def test_short_prompt_has_defined_result(tok):
    model = _one_pos(tok)
    cfg = ReagentConfig(num_probes=8, max_steps=200, keep_top_n=5)
    ctx = _context(tok, "the movie was great")  # <s> + 4 replaceable tokens <= keep_top_n
    eng = _engine(model, tok, cfg)
    [res] = eng.run([Target(ctx, model.target_for(int(ctx[J])))])
    assert res.note == "short_context" and res.converged
    assert int(np.argmax(res.scores)) == J
    assert np.all(res.steps >= 2)  # every position replaced at least once before a stop
    one = np.asarray(tok("great")["input_ids"])  # <s> great
    [r1] = eng.run([Target(one, 7)])
    assert r1.note == "single_position" and r1.scores.tolist() == [0.0, 1.0]
    [r0] = eng.run([Target(one[:1], 7)])
    assert r0.note == "no_replaceable" and not r0.converged and r0.scores.tolist() == [0.0]


def test_sampled_ids_valid_and_special_tokens_never_replaced(tok):
    model = _one_pos(tok)
    ctx = np.asarray(tok("<s> the movie [SEP] was great </s> and i [CLS] loved it")["input_ids"])
    special = np.isin(ctx, sorted(special_token_ids(tok)))
    assert special.sum() >= 4
    cfg = ReagentConfig(num_probes=6, max_steps=30, replacing_ratio=0.6, keep_top_n=2)
    res = _engine(model, tok, cfg).run([Target(ctx, model.target_for(int(ctx[J])))])[0]
    rows = np.concatenate([b for b in model.forward_log if b.shape[1] == len(ctx)])
    assert len(rows) > 20
    assert np.all(rows[:, special] == ctx[special])
    changed = rows != ctx
    assert changed.any()
    new_ids = rows[changed]
    assert new_ids.min() >= 0 and new_ids.max() < len(tok)
    assert not np.isin(new_ids, sorted(special_token_ids(tok))).any()
    assert np.all(res.scores[special] == 0.0)


def test_uniform_sampler_respects_model_vocab_smaller_than_tokenizer(tok):
    model = OnePositionLM(len(tok) - 20, J)  # tokenizer knows ids the model cannot embed
    valid = valid_token_ids(model, tok)
    assert valid.max() < len(tok) - 20
    rows = UniformSampler(valid).replace(np.arange(8), np.arange(8), np.ones((50, 8), bool), np.random.default_rng(0).random((50, 8)))
    assert rows.max() < len(tok) - 20


def test_chat_template_special_tokens_never_replaced_nor_sampled(tok):
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<s> [CLS] {{ m['content'] }} [SEP] {% endfor %}"
                         "{% if add_generation_prompt %}</s> [CLS]{% endif %}")
    model = _one_pos(tok)
    res = reagent_attribute(model, tok, "the movie was great", target="good", chat_template=True, num_probes=4, max_steps=30)
    df = res.attributions
    assert df.is_special.sum() >= 5
    assert (df[df.is_special].score == 0).all()
    sp = sorted(special_token_ids(tok))
    ctx = res.prompts[0].ids[: res.prompts[0].n_prompt]
    rows = np.concatenate([b for b in model.forward_log if b.shape[1] == len(ctx)])
    special = np.isin(ctx, sp)
    assert np.all(rows[:, special] == ctx[special])
    assert not np.isin(rows[:, ~special], sp).any()


def test_several_prompts_in_one_call_match_separate_calls(tiny_llama):
    model, tok = tiny_llama
    prompts = ["the movie was great", "i hated the ending and the script", "a wonderful story"]
    kw = dict(max_new_tokens=2, num_probes=3, max_steps=10)
    both = reagent_attribute(model, tok, prompts, **kw)
    assert sorted(both.attributions.prompt_id.unique()) == [0, 1, 2]
    assert both.attributions.score.notna().all()
    cfg = ReagentConfig(**{k: v for k, v in kw.items() if k != "max_new_tokens"})
    runner = ReagentRunner(model, tok, cfg)
    alone = runner.run([prepare_prompt(model, tok, prompts[1], prompt_id=1, max_new_tokens=2)])
    got = both.attributions[both.attributions.prompt_id == 1].score.to_numpy()
    assert np.allclose(got, [r["score"] for r in alone.attributions], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Samplers


def test_pos_sampler_preserves_part_of_speech(tok):
    import importlib.util

    if importlib.util.find_spec("textblob_aptagger") is None:
        pytest.skip("extra 'pos' (textblob-aptagger) not installed")
    from freeshap_ray.reagent import PosSampler
    from freeshap_ray.reagent.pos import load_tagger

    assert load_tagger().tag(["the", "movie", "was", "great"]) == ["DT", "NN", "VBD", "JJ"]
    model = _one_pos(tok)
    s = PosSampler(valid_token_ids(model, tok), tok)
    ctx = np.asarray(tok("the movie was great")["input_ids"])
    pos = np.arange(1, len(ctx))
    tags = s.context_tags(ctx, pos)
    assert tags == ["DET", "NOUN", "VERB", "ADJ"]
    rows = s.replace(ctx, pos, np.ones((40, len(pos)), bool), np.random.default_rng(0).random((40, len(pos))))
    for j, tag in enumerate(tags):
        assert set(rows[:, pos[j]]) <= set(s.groups[tag].tolist())
    assert not np.isin(rows[:, pos], sorted(special_token_ids(tok))).any()


def test_pos_sampler_missing_tagger_is_a_clear_error(tok, monkeypatch):
    import importlib.util

    from freeshap_ray.reagent import pos

    pos.load_tagger.cache_clear()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "textblob_aptagger" else real(name, *a))
    with pytest.raises(ConfigError, match="reagent.sampler"):
        pos.load_tagger()
    pos.load_tagger.cache_clear()


def test_sampler_keyword_is_the_config_key_and_replacer_takes_an_object(tok):
    import importlib.util

    if importlib.util.find_spec("textblob_aptagger") is None:
        pytest.skip("extra 'pos' (textblob-aptagger) not installed")
    from freeshap_ray.reagent import PosSampler

    text = "the movie was great and the music was very good"
    model = _one_pos(tok)
    res = reagent_attribute(model, tok, text, target="x", sampler="pos", num_probes=3, max_steps=20)
    assert res.attributions.score.notna().all()
    ctx = res.prompts[0].ids[: res.prompts[0].n_prompt]
    pos = np.flatnonzero(~np.isin(ctx, sorted(special_token_ids(tok))))
    groups = PosSampler(valid_token_ids(model, tok), tok)
    tags = groups.context_tags(ctx, pos)
    rows = np.concatenate([b for b in model.forward_log if b.shape[1] == len(ctx)])
    changed = rows[:, pos] != ctx[pos]
    assert changed.any()
    for k, tag in enumerate(tags):  # every replacement keeps the coarse part of speech: the POS sampler ran
        assert set(rows[changed[:, k], pos[k]].tolist()) <= set(groups.groups[tag].tolist()), tag

    model = _one_pos(tok)
    only = int(valid_token_ids(model, tok)[5])
    reagent_attribute(model, tok, text, target="x", replacer=UniformSampler(np.array([only])), num_probes=3, max_steps=5)
    rows = np.concatenate([b for b in model.forward_log if b.shape[1] == len(ctx)])
    assert set(rows[:, pos][rows[:, pos] != ctx[pos]].tolist()) == {only}


@pytest.mark.parametrize(("kwargs", "key"), [
    (dict(sampler="nope"), r"^reagent\.sampler: must be one of \['uniform', 'pos', 'mlm'\], got 'nope'"),
    (dict(sampler=3), r"^reagent\.sampler: must be one of .*got 3"),
    (dict(sampler=None), r"^reagent\.sampler"),
    (dict(sampler=UniformSampler(np.arange(5))), r"^reagent\.sampler: a sampler name .*replacer="),
    (dict(replacer="pos"), r"^replacer: expected a freeshap_ray\.reagent\.Sampler, got str"),
    (dict(replacer=UniformSampler(np.arange(5)), sampler="pos"), r"^replacer: give sampler=NAME or replacer"),
    (dict(num_probes="8"), r"^reagent\.num_probes: expected an integer"),
    (dict(max_new_tokens=0), r"^prompts\.max_new_tokens: must be >= 1"),
    (dict(chat_template="yes"), r"^prompts\.chat_template: expected true/false"),
    (dict(baselines="random"), r"^evaluation\.baselines: expected a list"),
    (dict(baselines=["lime"]), r"^evaluation\.baselines\[0\]"),
    (dict(metric_samples=0), r"^evaluation\.metric_samples"),
    (dict(config={"num_probes": 3}), r"^config: expected a freeshap_ray\.config\.ReagentConfig"),
    (dict(schedule="fast"), r"^schedule: must be"),
])
def test_reagent_attribute_bad_keywords_are_config_errors(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        reagent_attribute(None, None, "x", **kwargs)  # checked before the model is touched


def test_reagent_config_sampler_checked_when_built_directly():
    with pytest.raises(ConfigError, match=r"^reagent\.sampler: must be one of"):
        ReagentConfig(sampler="nope")
    with pytest.raises(ConfigError, match=r"^replacer"):
        ReagentRunner(_one_pos(tiny_tokenizer()), tiny_tokenizer(), replacer="pos")


def test_mlm_sampler_samples_valid_ids(tiny_llama):
    from freeshap_ray.reagent import build_sampler

    model, tok = tiny_llama
    s = build_sampler("mlm", model, tok, mlm_path="tiny:bert-mlm")
    ctx = np.asarray(tok("the movie was great and i loved it")["input_ids"])
    pos = np.arange(1, len(ctx))
    mask = np.random.default_rng(1).random((10, len(pos))) < 0.5
    rows = s.replace(ctx, pos, mask, np.random.default_rng(2).random((10, len(pos))))
    assert np.all(rows[:, 0] == ctx[0])
    assert np.all(rows[:, pos][~mask] == np.broadcast_to(ctx[pos], mask.shape)[~mask])
    new = rows[:, pos][mask]
    assert new.max() < len(tok) and not np.isin(new, sorted(special_token_ids(tok))).any()
    with pytest.raises(ConfigError, match="reagent.mlm_path"):
        build_sampler("mlm", model, tok, mlm_path="tiny:llama")


# ----------------------------------------------------------------------------------------------
# Metrics, baselines, outputs, config


def test_soft_metrics_oracle_beats_random(tok):
    model = _one_pos(tok)
    ctx = _context(tok)
    pos = np.flatnonzero(~np.isin(ctx, sorted(special_token_ids(tok))))
    oracle = np.zeros(len(ctx))
    oracle[J] = 1.0
    m = soft_faithfulness(model, Target(ctx, 0), oracle, pos, n_samples=16, seed=0)
    assert m["log_soft_ns"] > 0.5 and m["log_soft_nc"] > 0.5
    assert m["soft_ns"] > 0.99 and m["soft_nc"] > 0.99  # keeping exactly j restores p; removing it is the zero input
    anti = np.ones(len(ctx))
    anti[J] = 0.0
    bad = soft_faithfulness(model, Target(ctx, 0), anti, pos, n_samples=16, seed=0)
    assert bad["log_soft_ns"] < 0 and bad["log_soft_nc"] < 0


def test_reagent_on_one_position_model_beats_random_and_baselines_run(tok):
    model = _one_pos(tok)
    ctx = _context(tok)
    res = reagent_attribute(model, tok, "the movie was great and the music was very good", target="x",
                            num_probes=6, max_steps=200, baselines=["input_x_gradient", "integrated_gradients", "random"],
                            metrics=True)
    del ctx
    met = res.metrics.set_index("method")
    assert met.loc["reagent", "log_soft_ns"] > 0 and met.loc["reagent", "log_soft_nc"] > 0
    for method in ("input_x_gradient", "integrated_gradients"):
        s = res.scores(method=method)
        assert int(np.argmax(s)) == J and np.isclose(s.sum(), 1.0)


def test_attention_baseline_and_heatmap(tiny_llama):
    model, tok = tiny_llama
    ctx = np.asarray(tok("the movie was great")["input_ids"])
    pos = np.arange(1, len(ctx))
    s = baseline_scores("attention", model, Target(ctx, 7), pos)
    assert s[0] == 0.0 and np.isclose(s.sum(), 1.0) and np.all(s >= 0)
    assert model.config._attn_implementation != "eager"  # restored
    res = reagent_attribute(model, tok, "the movie was", max_new_tokens=1, num_probes=2, max_steps=5)
    page = res.to_html()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    assert "movie" in page and page.count("class='t'") == 1
    row = dict(method="reagent", prompt_id=0, target_pos=1, target_token="<b>", source_pos=0, source_token="a&<i>",
               is_special=False, score=0.5, converged=False, note="")
    page = heatmap_html([row])
    assert "a&amp;&lt;i&gt;" in page and "&lt;b&gt;" in page and "<i>" not in page and "not converged" in page


def test_reagent_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^reagent.num_probes"):
        reagent_config_from_dict({"prompts": {"path": "p.txt"}, "reagent": {"num_probes": 0}})
    with pytest.raises(ConfigError, match=r"^reagent.replacing_ratio"):
        reagent_config_from_dict({"prompts": {"path": "p.txt"}, "reagent": {"replacing_ratio": 1.5}})
    with pytest.raises(ConfigError, match=r"^reagent.mlm_path"):
        reagent_config_from_dict({"prompts": {"path": "p.txt"}, "reagent": {"sampler": "mlm"}})
    with pytest.raises(ConfigError, match=r"^evaluation.baselines\[0\]"):
        reagent_config_from_dict({"prompts": {"path": "p.txt"}, "evaluation": {"baselines": ["lime"]}})
    with pytest.raises(ConfigError, match=r"^prompts.path"):
        reagent_config_from_dict({})
    with pytest.raises(ConfigError, match=r"^reagent.num_probe"):
        reagent_attribute(None, None, "x", num_probe=3)
