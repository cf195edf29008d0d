"""The whisper pipeline on a tiny random Whisper, against transformers in PyTorch.

The model is a random `WhisperForConditionalGeneration` saved with `save_pretrained`;
it shares tiny.en's vocabulary size so the real tokenizer applies. The reference decode
is the transformers forward pass with a plain greedy loop written here (suppression as
the pipeline documents it), on features from transformers' `WhisperFeatureExtractor`
padded to the bucket length.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models.checkpoint import read_hf_folder  # noqa: E402
from models.registry import WhisperModel, resolve_model  # noqa: E402
from models.whisper.batch import Decoded  # noqa: E402
from models.whisper.model import WhisperConfig  # noqa: E402
from models.whisper.params import params_from_hf  # noqa: E402
from models.whisper.tokenizer import WhisperTokenizer  # noqa: E402
from streamd.engine import Engine  # noqa: E402
from streamd.pipelines.whisper import (  # noqa: E402
    PAD,
    Job,
    WhisperPipeline,
    bucket_ladder,
)
from streamd.recognizer import (  # noqa: E402
    Hypothesis,
    RecognizerOptions,
    SegmentInfo,
    clear_context,
)

RATE = 16000
HF_KW = dict(
    vocab_size=51864, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
    decoder_ffn_dim=128, max_source_positions=100, max_target_positions=64,
    decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256, bos_token_id=50256,
    suppress_tokens=[1, 2, 7, 8, 9], begin_suppress_tokens=[220, 50256],
)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer() -> WhisperTokenizer:
    try:
        folder = resolve_model("tiny.en")
    except Exception as exc:  # the embedded model package is missing
        pytest.skip(f"tiny.en tokenizer not available: {exc}")
    return WhisperTokenizer.from_file(folder)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[float, object]:
    """Reference models per bucket: the 2 s one as saved, the 1 s one the same weights
    with the first 50 encoder positions (transformers wants inputs of exactly its size)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-whisper")
    model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**HF_KW))
    model.save_pretrained(folder)
    short = transformers.WhisperForConditionalGeneration(
        transformers.WhisperConfig(**{**HF_KW, "max_source_positions": 50}))
    state = model.state_dict()
    key = "model.encoder.embed_positions.weight"
    state[key] = state[key][:50]
    short.load_state_dict(state)
    return {"folder": folder, 2.0: model.eval(), 1.0: short.eval()}


@pytest.fixture(scope="module")
def model(hf_models, tokenizer) -> WhisperModel:
    hf_config, tensors = read_hf_folder(hf_models["folder"])
    config = WhisperConfig.from_hf_config(hf_config)
    params = params_from_hf(config, tensors)
    return WhisperModel(config, params, tokenizer, Path(hf_models["folder"]))


@pytest.fixture(scope="module")
def pipeline(model) -> WhisperPipeline:
    engine = Engine(batch_sizes=(1, 4))
    # Finals use at least the 2 s window here (10 s with tiny.en): partials of short audio
    # go to the 1 s bucket, its final to the 2 s one.
    pipe = WhisperPipeline(engine, model, buckets_s=(1.0, 2.0), max_segment_s=1.5,
                           final_min_s=2.0)
    compiled = pipe.compiled_shapes()
    engine.warmup()
    pipe.warmup_compiles = pipe.compiled_shapes() - compiled
    return pipe


def reference_decode(hf, tok, pipe, audio, prefix, seconds, budget=None, previous=()):
    """transformers forward + greedy with the pipeline's suppression rules, stopping after
    `budget` new tokens (default: the bucket's cap); `previous`: `<|startofprev|>` text
    before the SOT sequence."""
    fe = transformers.WhisperFeatureExtractor(feature_size=80, chunk_length=int(seconds))
    feats = fe(audio, sampling_rate=RATE, return_tensors="pt").input_features
    spec = pipe.spec_for(len(audio))
    assert spec.seconds == seconds
    suppress = torch.tensor(spec.filters[0].ids)
    head = [tok.sot_prev, *previous] if previous else []
    ids = head + list(pipe.sot_sequence) + list(prefix)
    out, logprob = [], 0.0
    with torch.no_grad():
        enc = hf.model.encoder(feats).last_hidden_state
        first = hf(encoder_outputs=(enc,), decoder_input_ids=torch.tensor([ids])).logits[0]
        no_speech = torch.softmax(first[len(head)], -1)[tok.no_speech].item()
        for t in range(min(spec.max_new_tokens, budget or spec.max_new_tokens)):
            logits = hf(encoder_outputs=(enc,), decoder_input_ids=torch.tensor([ids + out]))
            x = logits.logits[0, -1].double()
            x[suppress] = -np.inf
            if t == 0:
                x[list(spec.filters[1].ids)] = -np.inf
            lp = torch.log_softmax(x, -1)
            nxt = int(torch.argmax(x))
            logprob += lp[nxt].item()
            if nxt == tok.eot:
                break
            out.append(nxt)
    return out, logprob / (len(out) + 1), no_speech


def test_buckets_and_budgets(pipeline) -> None:
    # A final keeps a quarter of its window silent: a 20 s segment needs the 30 s window.
    assert bucket_ladder(15.0) == (2.0, 4.0, 6.0, 10.0, 14.0, 21.0)
    assert bucket_ladder(20.0) == (2.0, 4.0, 6.0, 10.0, 14.0, 21.0, 30.0)
    assert bucket_ladder(3.0) == (2.0, 4.0, 6.0, 10.0)  # room for a 10 s final window
    assert [s.seconds for s in pipeline.specs] == [1.0, 2.0]
    assert pipeline.spec_for(8000).seconds == 1.0
    assert pipeline.spec_for(8000, final=True).seconds == 2.0
    for spec in pipeline.specs:
        assert spec.prompt_width + spec.max_new_tokens <= pipeline.config.max_target_positions
    # Warm-up compiled every (bucket, prompt width, batch size) this pipeline can issue,
    # nothing else: each bucket has a second, wider prompt for previous text, as wide as
    # <|startofprev|> + context_tokens + the SOT sequence or the decoder's room allows.
    assert set(pipeline.wide) == set(pipeline.specs)
    need = 1 + pipeline.context_tokens + len(pipeline.sot_sequence)
    for wide in pipeline.wide.values():
        assert wide.context_width >= 2
        width = wide.context_width + wide.prompt_width
        assert width == min(need, pipeline.config.max_target_positions - wide.max_new_tokens)
        assert width + wide.max_new_tokens <= pipeline.config.max_target_positions
    assert pipeline.warmup_compiles == 2 * sum(len(pipeline.batch_sizes(s))
                                               for s in pipeline.specs)


def test_batch_matches_transformers(pipeline, hf_models, tokenizer) -> None:
    rng = np.random.default_rng(1)
    jobs = [
        Job(rng.standard_normal(9000).astype(np.float32) * 0.1),  # 1 s bucket
        Job(rng.standard_normal(12000).astype(np.float32) * 0.1, prefix=(464, 3797)),
        Job(rng.standard_normal(20000).astype(np.float32) * 0.1, prefix=(314,)),  # 2 s
    ]
    for seconds in (1.0, 2.0):
        spec = next(s for s in pipeline.specs if s.seconds == seconds)
        mine = [j for j in jobs if pipeline.spec_for(len(j.audio)) is spec]
        assert mine
        # As the engine hands it over: padded with empty slots to a batch size (one call;
        # the engine drops the empty rows' results).
        results = pipeline._run(spec, mine + [PAD] * (4 - len(mine)))
        assert len(results) == 4
        for job, got in zip(mine, results, strict=False):
            tokens, avg_lp, no_speech = reference_decode(
                hf_models[seconds], tokenizer, pipeline, job.audio, job.prefix, seconds,
                job.budget())
            assert list(got.tokens) == tokens
            assert got.avg_logprob == pytest.approx(avg_lp, abs=2e-3)
            assert got.no_speech_prob == pytest.approx(no_speech, abs=1e-4)


def test_recognizer_partials_stable_and_final_no_recompile(pipeline) -> None:
    """Through the real Engine: stable prefixes only grow, the final keeps the last stable
    prefix and is the fresh decode of the whole segment (committed prefix not forced)
    whenever that decode keeps it, a closing partial's decode is reused
    by the final of the same audio (no engine call) and not by a final of other audio,
    concurrent sessions get their own results, and nothing recompiles."""
    engine = pipeline.engine
    before = pipeline.compiled_shapes()
    rng = np.random.default_rng(2)
    audio = [rng.standard_normal(int(1.5 * RATE)).astype(np.float32) * 0.2 for _ in range(2)]

    def whole(result) -> str:
        # (with a repetition loop at its end cut, as random weights love to loop)
        words = pipeline.cut_loop(pipeline.words(result.tokens), 0)
        return pipeline.words_text(words)

    recognizers = [pipeline.new_recognizer(f"s{k}") for k in range(2)]

    async def segment0(k: int) -> dict:
        rec = recognizers[k]
        info = SegmentInfo(f"s{k}", 0, 0.0, 1.5)
        partials = []
        for n in range(4000, len(audio[k]) + 1, 4000):
            partials.append(await rec.partial(audio[k][:n], info))
        committed = pipeline.words_text(rec.policy.committed)
        final = await rec.final(audio[k], info)
        alone = await pipeline.recognize(audio[k], (), final=True)
        return dict(partials=partials, final=final, alone=alone, committed=committed)

    async def segments12(k: int) -> dict:
        # Run with the engine otherwise idle: a closing partial is skipped (by design) when
        # another request waits, which concurrent sessions make a matter of timing.
        rec = recognizers[k]
        # Segment 1: a closing partial on 1.25 s, then the endpoint's final on that audio.
        info1 = SegmentInfo(f"s{k}", 1, 2.0, 3.25, closing=True)
        await rec.partial(audio[k][:20000], info1)
        early = pipeline.finals_early
        final1 = await rec.final(audio[k][:20000], dataclasses.replace(info1, closing=False))
        reused = pipeline.finals_early - early
        alone1 = await pipeline.recognize(audio[k][:20000], (), final=True)
        # Segment 2: speech resumed after the pause, so the final's audio is longer.
        info2 = SegmentInfo(f"s{k}", 2, 4.0, 5.0, closing=True)
        await rec.partial(audio[k][:16000], info2)
        final2 = await rec.final(audio[k], SegmentInfo(f"s{k}", 2, 4.0, 5.5))
        return dict(final1=final1, alone1=alone1, reused=reused, final2=final2)

    async def main():
        engine.start()
        try:
            results = await asyncio.gather(segment0(0), segment0(1))  # concurrent sessions
            for k, r in enumerate(results):
                r.update(await segments12(k))
            return results
        finally:
            await engine.stop()

    early_before = pipeline.finals_early
    results = asyncio.run(main())
    # Exactly the two segment-1 finals (one per session) came from closing partials.
    assert pipeline.finals_early - early_before == 2
    for r in results:
        stables = [p.stable for p in r["partials"] if p is not None]
        for a, b in zip(stables, stables[1:], strict=False):
            assert b.startswith(a)
        for p in r["partials"]:
            if p is not None:
                assert p.text.startswith(p.stable)
        # The contract: the final keeps the stable prefix; it is the fresh decode when
        # that decode keeps it (else the prefix is forced: see the test below).
        assert r["final"].text.startswith(r["committed"])
        if whole(r["alone"]).startswith(r["committed"]):
            assert r["final"].text == whole(r["alone"])
        assert r["final1"].text == whole(r["alone1"])
        assert r["final2"].text == whole(r["alone"])  # decoded again on the longer audio
    assert [r["reused"] for r in results] == [1, 1]  # each session's final 1, exactly
    assert pipeline.compiled_shapes() == before


def test_final_keeps_a_stable_prefix_the_fresh_decode_contradicts(pipeline) -> None:
    """A committed (stable) prefix that the fresh decode of the final does not start with
    is forced into a second decode: the final starts with it, and the rest is the
    decoder's continuation after that prefix."""
    engine = pipeline.engine
    audio = np.random.default_rng(5).standard_normal(int(1.5 * RATE)).astype(np.float32) * 0.2
    info = SegmentInfo("kept", 0, 0.0, 1.5)

    async def main():
        engine.start()
        try:
            fresh = await pipeline.recognize(audio, (), final=True)
            fresh_words = pipeline.words(fresh.tokens)
            # Two words that the fresh decode does not start with.
            promised = tuple(w for w in pipeline.words(pipeline.tokenizer.encode(" zebra quartz"))
                             if not fresh_words or w != fresh_words[0])
            assert promised
            rec = pipeline.new_recognizer("kept")
            rec._enter(0)
            rec.policy.committed = promised
            before = pipeline.finals_restabilized
            final = await rec.final(audio, info)
            forced = await pipeline.recognize(audio, pipeline.tokens(promised), final=True)
            return promised, final, forced, pipeline.finals_restabilized - before
        finally:
            await engine.stop()

    promised, final, forced, redone = asyncio.run(main())
    assert redone == 1
    stable = pipeline.words_text(promised)
    assert final.text.startswith(stable)
    words = pipeline.cut_loop(list(promised) + pipeline.words(forced.tokens), len(promised))
    assert final.text == pipeline.words_text(words)


def _final_after_fake_decode(pipeline, monkeypatch, session: str, stable: str,
                             decoded: str) -> tuple[Hypothesis, list]:
    """The final of a segment whose partials made `stable` stable and whose every decode
    says `decoded` (faked: a random model does not say such sentences); the prefixes the
    decodes were asked to force."""
    tok = pipeline.tokenizer
    calls: list = []

    async def fake_recognize(audio, prefix=(), final=False, previous=()):
        calls.append(prefix)
        return Decoded(tuple(tok.encode(decoded)), -0.1, 0.0)

    monkeypatch.setattr(pipeline, "recognize", fake_recognize)
    rec = pipeline.new_recognizer(session)
    rec._enter(0)
    rec.policy.committed = tuple(pipeline.words(tok.encode(stable)))
    final = asyncio.run(rec.final(np.zeros(RATE, np.float32), SegmentInfo(session, 0, 0, 1)))
    return final, calls


def test_final_takes_the_stable_spelling_of_the_same_words(pipeline, monkeypatch) -> None:
    """A fresh final whose first words are the stable words in another case or
    punctuation is not decoded again: it starts with the stable spelling and goes on
    with the fresh decode's own words."""
    before = pipeline.finals_restabilized
    final, calls = _final_after_fake_decode(pipeline, monkeypatch, "spelled",
                                            " the narrative would",
                                            " The narrative, would be tedious.")
    assert calls == [()] and pipeline.finals_restabilized == before  # one fresh decode
    assert final.text.strip() == "the narrative would be tedious."


def test_final_splices_other_words_for_the_stable_prefix(pipeline, monkeypatch) -> None:
    """A fresh final with other words for the stable prefix ("I'll" for "I will") is not
    decoded again: the final is the stable words, then the fresh decode after its match
    of the last stable word."""
    redone, spliced = pipeline.finals_restabilized, pipeline.finals_spliced
    final, calls = _final_after_fake_decode(pipeline, monkeypatch, "spliced", " I will go",
                                            " I'll go home now.")
    assert calls == [()]  # one fresh decode, no forced one
    assert (pipeline.finals_restabilized, pipeline.finals_spliced) == (redone, spliced + 1)
    assert final.text.strip() == "I will go home now."


def test_splice_point() -> None:
    """Where a fresh final goes on after the stable words, or None when they do not
    align near their own length."""
    from streamd.pipelines.whisper_recognizer import splice_point

    assert splice_point(["i", "will", "go"], ["ill", "go", "home"]) == 2
    assert splice_point(["the", "year", "1813"], ["the", "year", "eighteen", "thirteen",
                                                  "came"]) is None  # "1813" unmatched
    assert splice_point(["ask", "not"], ["asked", "not", "to"]) == 2
    assert splice_point(["a", "b"], ["x", "y", "z", "w", "a", "b"]) is None  # too far on
    assert splice_point(["a"], []) is None and splice_point([], ["a"]) is None


def test_closing_partial_is_skipped_when_the_engine_is_busy(pipeline, monkeypatch) -> None:
    """With a request waiting in the engine, a closing partial computes nothing (the
    endpoint's final must not wait behind it) and the final then decodes the audio itself."""
    engine = pipeline.engine
    audio = np.random.default_rng(4).standard_normal(20000).astype(np.float32) * 0.2
    info = SegmentInfo("busy", 0, 0.0, 1.25, closing=True)

    async def main():
        engine.start()
        try:
            rec = pipeline.new_recognizer("busy")
            with monkeypatch.context() as m:
                m.setattr(Engine, "queue_depth", property(lambda self: 1))
                skipped, early = pipeline.partials_skipped, pipeline.finals_early
                said = await rec.partial(audio, info)
                assert said is None and pipeline.partials_skipped == skipped + 1
            final = await rec.final(audio, dataclasses.replace(info, closing=False))
            assert pipeline.finals_early == early  # decoded at the endpoint, not reused
            alone = await pipeline.recognize(audio, (), final=True)
            return final, alone
        finally:
            await engine.stop()

    final, alone = asyncio.run(main())
    words = pipeline.cut_loop(pipeline.words(alone.tokens), 0)
    assert final.text == pipeline.words_text(words)


def test_partials_never_commit_the_last_word(pipeline) -> None:
    """n identical partials (LocalAgreement-n) agree on every word, yet the last one stays
    uncommitted (it may be cut short or carry guessed punctuation at the audio's end)."""
    engine = pipeline.engine
    rng = np.random.default_rng(3)

    async def main() -> list[tuple[tuple, tuple]]:
        engine.start()
        try:
            seen = []
            for k in range(6):
                audio = rng.standard_normal(int(0.8 * RATE)).astype(np.float32) * 0.2
                rec = pipeline.new_recognizer(f"w{k}")
                info = SegmentInfo(f"w{k}", 0, 0.0, 0.8)
                for _ in range(rec.policy.n):  # (random weights loop on one word: cut)
                    await rec.partial(audio, info)
                recent = list(rec.policy._recent)
                if len(recent) == rec.policy.n:  # every partial reached it (none silent)
                    seen.append((recent[-1], rec.policy.committed))
            return seen
        finally:
            await engine.stop()

    seen = asyncio.run(main())
    room = pipeline.prefix_room(int(0.8 * RATE))
    checked = 0
    for hyp, committed in seen:
        assert committed == hyp[: len(committed)]
        if hyp:
            fits = sum(1 for i in range(len(hyp)) if sum(map(len, hyp[: i + 1])) <= room)
            assert len(committed) == min(len(hyp) - 1, fits)
            checked += fits >= 1  # committing every agreed word would commit one more
    assert checked


def test_previous_text_matches_transformers(pipeline, hf_models, tokenizer) -> None:
    """Rows with previous text run in the bucket's wide shape, `<|startofprev|> previous`
    before the SOT sequence, as transformers decodes that prompt; a row without previous
    text in the same (wide) call keeps its own result, and previous text longer than the
    room keeps its newest tokens."""
    rng = np.random.default_rng(6)
    spec = pipeline.specs[0]
    wide = pipeline.wide[spec]
    room = wide.context_width + wide.prompt_width - len(pipeline.sot_sequence) - 1
    long = tuple(int(t) for t in rng.integers(300, 5000, room + 9))
    jobs = [
        Job(rng.standard_normal(9000).astype(np.float32) * 0.1, previous=(464, 3797, 318)),
        Job(rng.standard_normal(11000).astype(np.float32) * 0.1, prefix=(314,)),
        Job(rng.standard_normal(10000).astype(np.float32) * 0.1, prefix=(262,), previous=long),
    ]
    results = pipeline._run(spec, jobs + [PAD])
    for job, got in zip(jobs, results, strict=False):
        tokens, avg_lp, no_speech = reference_decode(
            hf_models[1.0], tokenizer, pipeline, job.audio, job.prefix, 1.0, job.budget(),
            previous=job.previous[-(room - len(job.prefix)):])  # the prefix shares the room
        assert list(got.tokens) == tokens
        assert got.avg_logprob == pytest.approx(avg_lp, abs=2e-3)
        assert got.no_speech_prob == pytest.approx(no_speech, abs=1e-4)


def test_context_false_reproduces_finals_and_no_compile_with_any_prompt(pipeline) -> None:
    """`context: false`: every request carries no previous text, so finals are exactly
    the fresh decodes of the narrow shape (today's finals). Context on, with a prompt of
    any length (empty, short, longer than the room): nothing compiles after warm-up."""
    engine = pipeline.engine
    before = pipeline.compiled_shapes()
    rng = np.random.default_rng(7)
    audio = [rng.standard_normal(int(1.2 * RATE)).astype(np.float32) * 0.2 for _ in range(3)]
    submitted: list[Job] = []
    submit = engine.submit

    async def spy(kind, job, priority=0):
        submitted.append(job)
        return await submit(kind, job, priority)

    def whole(result) -> str:
        return pipeline.words_text(pipeline.cut_loop(pipeline.words(result.tokens), 0))

    async def main():
        off = pipeline.new_recognizer("off", RecognizerOptions(context=False))
        finals = []
        for k, a in enumerate(audio):
            info = SegmentInfo("off", k, 2.0 * k, 2.0 * k + 1.2)
            for n in (6400, 12800):
                await off.partial(a[:n], info)
            finals.append((await off.final(a, info)).text)
        off_jobs = list(submitted)
        alone = [whole(await pipeline.recognize(a, (), final=True)) for a in audio]
        for words in (" Kennedy", " ask not " * 3, " what your country " * 40):
            on = pipeline.new_recognizer("on", RecognizerOptions(prompt=words))
            assert on.previous() and len(on.previous()) <= pipeline.context_tokens // 2
            info = SegmentInfo("on", 0, 0.0, 1.2)
            await on.partial(audio[0][:12800], info)
            await on.final(audio[0], info)
            await pipeline.recognize(audio[1], (), previous=tuple(range(300, 300 + len(words))))
        return finals, alone, off_jobs

    finals, alone, off_jobs = asyncio.run(_with_spy(engine, spy, main))
    assert all(job.previous == () for job in off_jobs)
    assert [f.strip() for f in finals] == [a.strip() for a in alone]
    assert pipeline.compiled_shapes() == before


async def _with_spy(engine, spy, main):
    """Runs `main()` with the engine started and its `submit` replaced by `spy`."""
    engine.submit = spy
    engine.start()
    try:
        return await main()
    finally:
        del engine.submit  # the method again
        await engine.stop()


class ScriptedDecoder:
    """A fake `pipeline.recognize`: text per (segment audio, prompted or not), so the
    context's bookkeeping is checked without a model that says sentences."""

    def __init__(self, pipeline, script: dict[tuple[int, bool], tuple[str, float]]) -> None:
        self.pipeline, self.script = pipeline, script
        self.calls: list[tuple[int, tuple[int, ...]]] = []

    async def __call__(self, audio, prefix=(), final=False, previous=()):
        segment = int(audio[0])  # the test marks each segment's audio with its number
        self.calls.append((segment, tuple(previous)))
        text, logprob = self.script[(segment, bool(previous))]
        ids = tuple(self.pipeline.tokenizer.encode(text)) if text else ()
        return Decoded(ids, logprob, 0.0)


def _segment_audio(k: int) -> np.ndarray:
    audio = np.zeros(RATE, np.float32)
    audio[0] = k
    return audio


def test_fallback_clears_the_context_and_does_not_poison_the_next(pipeline, monkeypatch):
    """Segment 0's final becomes the prompt of segment 1. Segment 1's prompted decode is a
    hallucinated loop: it is decoded again without the prompt (that is its final), the
    context is cleared, so segment 2 is decoded without any previous text; segment 3 then
    sees only segment 2's final."""
    tok = pipeline.tokenizer
    fake = ScriptedDecoder(pipeline, {
        (0, False): (" Ask not", -0.2),
        (1, True): (" what a loop" * 12, -0.3),  # compression ratio far over 2.4
        (1, False): (" what your country can do for you.", -0.3),
        (2, False): (" And so, my fellow Americans,", -0.2),
        (3, True): (" ask not.", -0.2),
    })
    monkeypatch.setattr(pipeline, "recognize", fake)
    rec = pipeline.new_recognizer("fb")
    before = pipeline.context_fallbacks

    async def main() -> list[str]:
        out = []
        for k in range(4):
            out.append((await rec.final(_segment_audio(k), SegmentInfo("fb", k, k, k + 1))).text)
        return out

    finals = asyncio.run(main())
    assert pipeline.context_fallbacks - before == 1
    assert finals[1].strip() == "what your country can do for you."
    prompts = dict(fake.calls)  # the last call per segment
    assert [c for c in fake.calls if c[0] == 1][0][1] == tuple(tok.encode(" Ask not"))
    assert prompts[2] == ()  # the hallucination never became context
    assert prompts[3] == tuple(tok.encode(" And so, my fellow Americans,"))


@pytest.mark.parametrize("failure", ["logprob", "no_speech"])
def test_low_confidence_prompted_final_falls_back(pipeline, monkeypatch, failure) -> None:
    """A prompted final with a low average log-probability, or a likely no-speech
    probability, is decoded again without the prompt (openai's fallback tests)."""
    fake = ScriptedDecoder(pipeline, {(0, False): (" Ask not", -0.2),
                                      (1, False): (" fine words", -0.2)})
    bad = Decoded(tuple(pipeline.tokenizer.encode(" odd")), -1.5 if failure == "logprob" else -0.2,
                  0.1 if failure == "logprob" else 0.9)

    async def recognize(audio, prefix=(), final=False, previous=()):
        if previous:
            fake.calls.append((int(audio[0]), tuple(previous)))
            return bad
        return await fake(audio, prefix, final, previous)

    monkeypatch.setattr(pipeline, "recognize", recognize)
    rec = pipeline.new_recognizer("lp")

    async def main():
        await rec.final(_segment_audio(0), SegmentInfo("lp", 0, 0, 1))
        return await rec.final(_segment_audio(1), SegmentInfo("lp", 1, 1, 2))

    before = pipeline.context_fallbacks
    assert asyncio.run(main()).text.strip() == "fine words"
    assert pipeline.context_fallbacks == before + 1 and rec.previous() == ()


def test_context_cleared_after_long_silence_on_request_and_at_close(pipeline,
                                                                    monkeypatch) -> None:
    """The previous text is dropped when the next segment starts more than
    `context_reset_s` after the last final ended, by `clear_context` (what a `finalize`
    calls), and at close; a session's `prompt` stays first in every case, and
    `context: false` with a prompt prompts with it alone."""
    tok = pipeline.tokenizer
    fake = ScriptedDecoder(pipeline, {(k, p): (f" words {k}", -0.2)
                                      for k in range(4) for p in (False, True)})
    monkeypatch.setattr(pipeline, "recognize", fake)
    gap = pipeline.context_reset_s
    prompt = tuple(tok.encode(" Kennedy"))

    async def final(rec, k, start):
        return await rec.final(_segment_audio(k), SegmentInfo("r", k, start, start + 1))

    async def main():
        rec = pipeline.new_recognizer("r", RecognizerOptions(prompt="Kennedy"))
        await final(rec, 0, 0.0)
        await final(rec, 1, 1.5)  # a short pause: segment 0 prompts it
        await final(rec, 2, 2.5 + gap + 0.1)  # a long silence: only the prompt
        clear_context(rec)
        await final(rec, 3, 3.5 + gap + 0.2)
        rec.close()
        assert rec.previous() == prompt
        plain = pipeline.new_recognizer("q", RecognizerOptions(context=False, prompt="Kennedy"))
        await final(plain, 0, 0.0)
        await final(plain, 1, 1.5)

    asyncio.run(main())
    prompts = [p for _, p in fake.calls]
    assert prompts[:4] == [prompt, prompt + tuple(tok.encode(" words 0")), prompt, prompt]
    assert prompts[4:] == [prompt, prompt]


def test_partials_are_prompted_only_with_context_partials(pipeline, monkeypatch) -> None:
    """By default only finals see the previous text (prompted partials committed the
    prompt's guesses); `context_partials` prompts partials too."""
    tok = pipeline.tokenizer
    fake = ScriptedDecoder(pipeline, {(k, p): (" ask not what", -0.2)
                                      for k in range(2) for p in (False, True)})
    monkeypatch.setattr(pipeline, "recognize", fake)

    async def main() -> None:
        rec = pipeline.new_recognizer("pp")
        await rec.final(_segment_audio(0), SegmentInfo("pp", 0, 0, 1))
        await rec.partial(_segment_audio(1), SegmentInfo("pp", 1, 1.2, 2))
        monkeypatch.setattr(pipeline, "context_partials", True)
        await rec.partial(_segment_audio(1), SegmentInfo("pp", 1, 1.2, 2.4))

    asyncio.run(main())
    assert [p for _, p in fake.calls] == [(), (), tuple(tok.encode(" ask not what"))]
