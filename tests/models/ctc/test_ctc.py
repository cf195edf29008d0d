"""CTC decoding against references: transformers' Wav2Vec2CTCTokenizer (text, word
offsets), a brute-force sum over all CTC paths (beam search, alignment) and torch's CTC
loss (labelling probabilities); streaming against one-shot decoding."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from models.checkpoint import ModelLoadError
from models.ctc import (
    CTCVocab,
    GreedyState,
    align,
    align_batch,
    beam_init,
    beam_reset,
    beam_results,
    beam_step,
    greedy_decode,
    greedy_decode_batch,
    greedy_result,
    greedy_step,
    greedy_step_batch,
    prefix_beam_search,
    prefix_beam_search_batch,
)

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

CHARS = ["<pad>", "<s>", "</s>", "<unk>", "|", "E", "T", "A", "O", "'", "Σ"]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.tensor(np.asarray(x), dtype=torch.float64), -1).numpy()


def _collapse(path, blank: int = 0) -> tuple[int, ...]:
    return tuple(c for i, c in enumerate(path) if c != blank and (i == 0 or path[i - 1] != c))


def _brute_force(log_probs: np.ndarray) -> tuple[dict, dict]:
    """Every alignment of a small [T, V] problem: labelling → log of the summed path
    probabilities, and labelling → its single most probable path."""
    steps, size = log_probs.shape
    total: dict[tuple[int, ...], float] = {}
    best: dict[tuple[int, ...], tuple[float, tuple[int, ...]]] = {}
    for path in itertools.product(range(size), repeat=steps):
        label = _collapse(path)
        score = float(log_probs[np.arange(steps), path].sum())
        total[label] = float(np.logaddexp(total.get(label, -np.inf), score))
        if label not in best or score > best[label][0]:
            best[label] = (score, path)
    return total, {k: v[1] for k, v in best.items()}


def _runs(path, blank: int = 0) -> list[tuple[int, int, int]]:
    """(token, start, end) of the non-blank runs of a frame path."""
    out = []
    for start, end in zip(*_run_bounds(path), strict=True):
        if path[start] != blank:
            out.append((int(path[start]), start, end))
    return out


def _run_bounds(path):
    change = [i for i in range(1, len(path)) if path[i] != path[i - 1]]
    return [0, *change], [*change, len(path)]


def _assert_same(got, want) -> None:
    """Hypotheses equal up to float summation order."""
    assert (got.text, got.tokens) == (want.text, want.tokens)
    assert got.score == pytest.approx(want.score, abs=1e-9)
    assert len(got.words) == len(want.words)
    for ours, theirs in zip(got.words, want.words, strict=True):
        assert ours == pytest.approx(theirs, abs=1e-9)


def _peaky_logits(rng: np.random.Generator, steps: int, size: int, blank: int = 0) -> np.ndarray:
    """Logits whose argmax path has runs of tokens and blanks (runs cross chunk edges)."""
    path = []
    while len(path) < steps:
        token = blank if rng.random() < 0.4 else int(rng.integers(0, size))
        path += [token] * int(rng.integers(1, 5))
    logits = rng.normal(size=(steps, size)) * 0.5
    logits[np.arange(steps), path[:steps]] += 4.0
    return logits


@pytest.fixture(scope="session", params=[False, True], ids=["cased", "lower"])
def hf_folder(request, tmp_path_factory) -> tuple[Path, object]:
    """A tokenizer saved by transformers, and transformers' own reload of it."""
    root = tmp_path_factory.mktemp("tok")
    vocab_file = root / "vocab.json"
    vocab_file.write_text(json.dumps({c: i for i, c in enumerate(CHARS)}), encoding="utf-8")
    tok = transformers.Wav2Vec2CTCTokenizer(str(vocab_file), do_lower_case=request.param)
    tok.save_pretrained(str(root / "saved"))
    return root / "saved", transformers.Wav2Vec2CTCTokenizer.from_pretrained(str(root / "saved"))


@pytest.fixture(scope="module")
def small_vocab() -> CTCVocab:
    return CTCVocab.from_dict({"<pad>": 0, "|": 1, "A": 2, "B": 3, "C": 4, "D": 5})


# ----------------------------------------------------------------------------- vocabulary


def test_vocab_matches_transformers(hf_folder):
    folder, ref = hf_folder
    vocab = CTCVocab.from_folder(folder)
    assert vocab.size == len(CHARS)
    assert list(vocab.tokens) == ref.convert_ids_to_tokens(list(range(len(CHARS))))
    assert vocab.blank_id == ref.pad_token_id
    assert vocab.word_delimiter_id == ref.word_delimiter_token_id
    assert vocab.do_lower_case == ref.do_lower_case


def test_vocab_nested_language(tmp_path):
    nested = {
        "eng": {"<pad>": 0, "<unk>": 1, "|": 2, "A": 3, "B": 4},
        "fra": {"<pad>": 0, "<unk>": 1, "|": 2, "É": 3, "C": 4, "D": 5},
    }
    (tmp_path / "nested.json").write_text(json.dumps(nested), encoding="utf-8")
    ref = transformers.Wav2Vec2CTCTokenizer(str(tmp_path / "nested.json"), target_lang="fra")
    ref.save_pretrained(str(tmp_path / "fra"))
    vocab = CTCVocab.from_folder(tmp_path / "fra")  # language from tokenizer_config.json
    ids = [3, 3, 0, 2, 4, 5, 0, 3]
    assert greedy_decode(np.array(ids), vocab).text == ref.decode(ids)
    assert CTCVocab.from_folder(tmp_path / "fra", target_lang="eng").tokens[3] == "A"

    config = tmp_path / "fra" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "target_lang": None}))
    with pytest.raises(ModelLoadError, match="multilingual.*target_lang"):
        CTCVocab.from_folder(tmp_path / "fra")
    with pytest.raises(ModelLoadError, match="'deu' not found"):
        CTCVocab.from_folder(tmp_path / "fra", target_lang="deu")


def test_vocab_legacy_special_tokens_map(tmp_path):
    """Old folders name their special tokens in special_tokens_map.json."""
    (tmp_path / "vocab.json").write_text(json.dumps({"[PAD]": 0, "[UNK]": 1, "_": 2, "a": 3}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"word_delimiter_token": "_"}))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"pad_token": "[PAD]", "unk_token": {"content": "[UNK]", "lstrip": False}})
    )
    ref = transformers.Wav2Vec2CTCTokenizer.from_pretrained(str(tmp_path))
    vocab = CTCVocab.from_folder(tmp_path)
    assert vocab.blank_id == ref.pad_token_id == 0
    assert vocab.unk_token == ref.unk_token
    # transformers 5.23's from_pretrained drops a configured word_delimiter_token (it
    # keeps "|"), so the text reference is the tokenizer built with the same settings.
    ref = transformers.Wav2Vec2CTCTokenizer(
        str(tmp_path / "vocab.json"),
        pad_token="[PAD]",
        unk_token="[UNK]",
        word_delimiter_token="_",
    )
    ids = [3, 0, 3, 2, 2, 1, 3, 0, 2]
    assert greedy_decode(np.array(ids), vocab).text == ref.decode(ids) == "aa [UNK]a"
    assert vocab.word_delimiter_id == 2
    assert CTCVocab.from_folder(tmp_path, word_delimiter="a").word_delimiter_id == 3


def test_vocab_errors_name_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match=r"vocab\.json not found"):
        CTCVocab.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"vocab\.json: cannot read it as JSON"):
        CTCVocab.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(ModelLoadError, match="pad token '<pad>'.*not in the vocabulary"):
        CTCVocab.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"<pad>": 0, "en": {"a": 1}}))
    with pytest.raises(ModelLoadError, match="mix"):
        CTCVocab.from_folder(tmp_path)


# ----------------------------------------------------------------------------- greedy


def test_greedy_matches_transformers(hf_folder):
    folder, ref = hf_folder
    vocab = CTCVocab.from_folder(folder)
    rng = np.random.default_rng(0)
    for trial in range(20):
        logits = _peaky_logits(rng, 80, len(CHARS)) if trial % 2 else rng.normal(size=(60, 11))
        ids = logits.argmax(-1).tolist()
        hyp = greedy_decode(logits, vocab, time_offset=1.5)
        want = ref.decode(ids, output_word_offsets=True)
        assert hyp.text == want.text
        assert hyp.text == ref.decode(hyp.tokens, group_tokens=False)
        # transformers' word offsets are frame indices, [start, end), words not lowercased.
        assert [w["word"] for w in hyp.words] == [
            w["word"].lower() if vocab.do_lower_case else w["word"] for w in want.word_offsets
        ]
        for ours, theirs in zip(hyp.words, want.word_offsets, strict=True):
            assert ours["start"] == pytest.approx(theirs["start_offset"] * 0.02 + 1.5)
            assert ours["end"] == pytest.approx(theirs["end_offset"] * 0.02 + 1.5)
        # the score is the argmax path's log probability
        lp = _log_softmax(logits)
        assert hyp.score == pytest.approx(lp.max(-1).sum())
        assert greedy_decode(np.array(ids), vocab).text == want.text  # ids in, no scores
        assert greedy_decode(np.array(ids), vocab).score is None


def test_greedy_batch_with_lengths(small_vocab):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 40, small_vocab.size)) * 3
    lengths = [40, 17, 0]
    hyps = greedy_decode_batch(logits, small_vocab, lengths)
    for b, n in enumerate(lengths):
        _assert_same(hyps[b], greedy_decode(logits[b, :n], small_vocab))
    assert hyps[2].text == "" and hyps[2].words == []
    # streamed in two padded chunks: the second chunk's padding is skipped per stream
    states = greedy_step_batch([GreedyState()] * 3, logits[:, :20], small_vocab, [20, 17, 0])
    states = greedy_step_batch(states, logits[:, 20:], small_vocab, [20, 0, 0])
    for b in range(3):
        _assert_same(greedy_result(states[b], small_vocab), hyps[b])


@pytest.mark.parametrize("seed", range(5))
def test_streaming_greedy_equals_one_shot(small_vocab, seed):
    rng = np.random.default_rng(seed)
    logits = _peaky_logits(rng, 150, small_vocab.size)
    cuts = np.sort(rng.choice(np.arange(1, 150), size=int(rng.integers(1, 12)), replace=False))
    state = GreedyState()
    for start, end in zip([0, *cuts], [*cuts, 150], strict=True):
        state = greedy_step(state, logits[start:end], small_vocab)
        # the partial after each chunk is the greedy decoding of everything so far
        _assert_same(greedy_result(state, small_vocab), greedy_decode(logits[:end], small_vocab))
    full = greedy_decode(logits, small_vocab)
    assert greedy_result(state, small_vocab).text == full.text
    assert state.frames == 150
    # ids fed chunk by chunk behave the same
    ids_state = GreedyState()
    for start, end in zip([0, *cuts], [*cuts, 150], strict=True):
        ids_state = greedy_step(ids_state, logits[start:end].argmax(-1), small_vocab)
    hyp = greedy_result(ids_state, small_vocab)
    assert hyp.tokens == full.tokens
    assert [(w["start"], w["end"]) for w in hyp.words] == [
        (w["start"], w["end"]) for w in full.words
    ]


# ----------------------------------------------------------------------------- timestamps


def test_word_timestamps_constructed():
    """A path with known frames: confidence is the mean probability of the word's token
    frames; times are frame × 20 ms + the chunk's offset."""
    vocab = CTCVocab.from_dict({"<pad>": 0, "|": 1, "H": 2, "I": 3, "Y": 4, "O": 5})
    #        0  1  2  3  4  5  6  7  8  9 10 11
    path = [0, 2, 2, 0, 3, 1, 1, 0, 4, 4, 5, 0]
    p_top = np.array([0.9, 0.8, 0.6, 0.9, 0.7, 0.5, 0.9, 0.9, 0.6, 0.8, 0.4, 0.9])
    probs = np.full((12, 6), 0.0)
    probs[np.arange(12), path] = p_top
    for t in range(12):  # spread the rest so the chosen token stays the argmax
        others = [v for v in range(6) if v != path[t]]
        probs[t, others] = (1 - p_top[t]) / 5
    hyp = greedy_decode(np.log(probs), vocab, time_offset=3.0)
    assert hyp.text == "HI YO"
    assert [w["word"] for w in hyp.words] == ["HI", "YO"]
    assert hyp.words[0]["start"] == pytest.approx(3.0 + 1 * 0.02)
    assert hyp.words[0]["end"] == pytest.approx(3.0 + 5 * 0.02)
    assert hyp.words[0]["confidence"] == pytest.approx(np.mean([0.8, 0.6, 0.7]))
    assert hyp.words[1]["start"] == pytest.approx(3.0 + 8 * 0.02)
    assert hyp.words[1]["end"] == pytest.approx(3.0 + 11 * 0.02)
    assert hyp.words[1]["confidence"] == pytest.approx(np.mean([0.6, 0.8, 0.4]))
    # beam search aligns the same labelling to the same frames
    beam = prefix_beam_search(np.log(probs), vocab, time_offset=3.0)[0]
    assert beam.text == "HI YO"
    assert [w["word"] for w in beam.words] == ["HI", "YO"]
    for ours, want in zip(beam.words, hyp.words, strict=True):
        assert ours == pytest.approx(want, abs=1e-6)  # beam keeps float32 log-probs


def test_align_is_best_path_of_labelling():
    """Viterbi alignment equals the brute-force best path of each labelling; the batched
    form handles streams of different lengths and labellings at once."""
    rng = np.random.default_rng(4)
    cases = []  # (log-probs, labelling, brute-force best path)
    for steps, size in [(6, 4), (5, 5), (3, 4), (1, 3)]:
        lp = _log_softmax(rng.normal(size=(steps, size)) * 2)
        total, best_path = _brute_force(lp)
        ranked = sorted(total, key=total.get, reverse=True)
        repeats = [k for k in ranked if any(x == y for x, y in itertools.pairwise(k))]  # "AA"
        for label in ranked[:12] + repeats[:4]:
            cases.append((lp, label, best_path[label]))
    for lp, label, path in cases:
        spans = align(lp, label, blank_id=0)
        assert list(zip(spans.tokens, spans.starts, spans.ends, strict=True)) == _runs(path)
        assert spans.prob_sums == pytest.approx(
            [np.exp(lp[s:e, tok]).sum() for tok, s, e in _runs(path)]
        )
    batched = align_batch([c[0] for c in cases], [c[1] for c in cases], blank_id=0)
    for (_, _, path), spans in zip(cases, batched, strict=True):
        assert list(zip(spans.tokens, spans.starts, spans.ends, strict=True)) == _runs(path)
    with pytest.raises(ValueError, match="cannot be aligned"):
        align(cases[-1][0], (1, 1), blank_id=0)  # "AA" needs 3 frames, there is 1


# ----------------------------------------------------------------------------- beam search


@pytest.mark.parametrize("shape", [(6, 4), (5, 5), (4, 5)])
def test_beam_search_equals_brute_force(shape):
    """A beam wide enough for every labelling gives every labelling's exact probability;
    narrower beams never overstate a labelling's probability."""
    steps, size = shape
    vocab = CTCVocab.from_dict({"<pad>": 0, "|": 1} | {chr(65 + i): i + 2 for i in range(size - 2)})
    rng = np.random.default_rng(steps * 10 + size)
    for _ in range(4):
        logits = rng.normal(size=shape) * rng.uniform(0.5, 3)
        total, _ = _brute_force(_log_softmax(logits))
        hyps = prefix_beam_search(logits, vocab, beam_width=len(total), token_min_logp=None)
        best = max(total, key=total.get)
        assert hyps[0].tokens == best
        assert hyps[0].score == pytest.approx(total[best], abs=1e-9)
        assert {h.tokens: h.score for h in hyps} == pytest.approx(total, abs=1e-9)
        for width in (1, 2, 3, 8):
            hyps = prefix_beam_search(logits, vocab, beam_width=width, token_min_logp=None)
            assert 1 <= len(hyps) <= width
            for h in hyps:
                assert h.score <= total[h.tokens] + 1e-9
                assert h.text == vocab.decode(h.tokens)


def _textbook_beam(log_probs: np.ndarray, width: int) -> dict[tuple[int, ...], float]:
    """The textbook prefix beam search, one prefix at a time with a dict: the reference for
    narrow beams, where the vectorized search must prune exactly the same way."""
    beams = {(): (0.0, -np.inf)}  # prefix → (log p ending in blank, ... in its last token)
    for frame in log_probs:
        grown: dict[tuple[int, ...], list[float]] = {}
        for prefix, (pb, pnb) in beams.items():
            total = np.logaddexp(pb, pnb)
            entry = grown.setdefault(prefix, [-np.inf, -np.inf])
            entry[0] = np.logaddexp(entry[0], total + frame[0])
            if prefix:
                entry[1] = np.logaddexp(entry[1], pnb + frame[prefix[-1]])
            for c in range(1, frame.size):
                source = pb if prefix and prefix[-1] == c else total
                entry = grown.setdefault(prefix + (c,), [-np.inf, -np.inf])
                entry[1] = np.logaddexp(entry[1], source + frame[c])
        ranked = sorted(grown.items(), key=lambda kv: -np.logaddexp(*kv[1]))[:width]
        beams = {k: (v[0], v[1]) for k, v in ranked}
    return {k: float(np.logaddexp(*v)) for k, v in beams.items() if np.logaddexp(*v) > -np.inf}


@pytest.mark.parametrize("width,size", [(1, 6), (2, 6), (4, 6), (8, 6), (2, 14), (4, 14)])
def test_beam_search_equals_textbook_on_longer_input(width, size):
    """With 14 tokens only the top width+1 of each frame extend a beam: still exact."""
    vocab = CTCVocab.from_dict({"<pad>": 0, "|": 1} | {chr(65 + i): i + 2 for i in range(size - 2)})
    rng = np.random.default_rng(width * size)
    logits = rng.normal(size=(30, size)) * 2.5
    want = _textbook_beam(_log_softmax(logits), width)
    hyps = prefix_beam_search(logits, vocab, beam_width=width, token_min_logp=None)
    assert {h.tokens: h.score for h in hyps} == pytest.approx(want, abs=1e-9)
    assert hyps[0].tokens == max(want, key=want.get)


def test_beam_search_equals_textbook_on_many_small_problems():
    """Narrow beams over small vocabularies, where extending by only the top `width`
    tokens of a frame would differ from the textbook search (it does for some of these)."""
    for seed in [*range(60), 111, 307, 339, 368]:  # the last four need top width+1
        rng = np.random.default_rng(seed)
        size, width, steps = (
            int(rng.integers(4, 8)),
            int(rng.integers(1, 3)),
            int(rng.integers(3, 10)),
        )
        vocab = CTCVocab.from_dict({"<pad>": 0} | {chr(65 + i): i + 1 for i in range(size - 1)})
        logits = rng.normal(size=(steps, size)) * rng.uniform(0.5, 4)
        want = _textbook_beam(_log_softmax(logits), width)
        hyps = prefix_beam_search(logits, vocab, beam_width=width, token_min_logp=None)
        assert {h.tokens: h.score for h in hyps} == pytest.approx(want, abs=1e-9), seed


def test_beam_scores_bounded_by_torch_ctc_loss(small_vocab):
    """A pruned beam loses the mass of paths through dropped prefixes: each score is at
    most log p(labelling), the negative of torch's CTC loss."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(30, small_vocab.size)) * 2.5
    lp = torch.tensor(_log_softmax(logits))
    for width in (4, 16):
        for h in prefix_beam_search(logits, small_vocab, beam_width=width):
            exact = -torch.nn.functional.ctc_loss(
                lp[:, None],
                torch.tensor([h.tokens]),
                torch.tensor([30]),
                torch.tensor([len(h.tokens)]),
                blank=0,
                reduction="sum",
            ).item()
            assert h.score <= exact + 1e-9


def test_beam_width_one_on_peaky_input_is_greedy(small_vocab):
    """With one dominant token per frame the single beam follows the argmax path. (On flat
    distributions it does not in general: it ranks prefixes by summed path mass.)"""
    rng = np.random.default_rng(3)
    for _ in range(5):
        logits = _peaky_logits(rng, 60, small_vocab.size) * 5
        beam = prefix_beam_search(logits, small_vocab, beam_width=1)[0]
        assert beam.tokens == greedy_decode(logits, small_vocab).tokens


@pytest.mark.parametrize("seed", range(4))
def test_streaming_beam_equals_one_shot(small_vocab, seed):
    rng = np.random.default_rng(seed)
    steps = 64
    logits = rng.normal(size=(steps, small_vocab.size)) * 2.5
    full = prefix_beam_search(logits, small_vocab, beam_width=6)
    cuts = np.sort(rng.choice(np.arange(1, steps), size=int(rng.integers(1, 8)), replace=False))
    state = beam_init(1, beam_width=6)
    for start, end in zip([0, *cuts], [*cuts, steps], strict=True):
        state = beam_step(state, logits[None, start:end], small_vocab)
        partial = beam_results(state, small_vocab)[0]
        assert partial[0].tokens == prefix_beam_search(logits[:end], small_vocab, 6)[0].tokens
    final = beam_results(state, small_vocab, words=True)[0]
    assert [h.tokens for h in final] == [h.tokens for h in full]
    assert [h.score for h in final] == pytest.approx([h.score for h in full])
    _assert_same(final[0], full[0])


def test_beam_batch_with_padding_equals_single(small_vocab):
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(4, 48, small_vocab.size)) * 2.5
    lengths = [48, 30, 1, 0]
    batch = prefix_beam_search_batch(logits, small_vocab, lengths, beam_width=5)
    for b, n in enumerate(lengths):
        single = prefix_beam_search(logits[b, :n], small_vocab, beam_width=5)
        assert [h.tokens for h in batch[b]] == [h.tokens for h in single]
        assert [h.score for h in batch[b]] == pytest.approx([h.score for h in single])
        _assert_same(batch[b][0], single[0])  # words aligned in one batched pass
    assert batch[3][0].tokens == () and batch[3][0].score == 0.0


def test_beam_long_prefixes_grow_capacity(small_vocab):
    """Prefixes longer than the initial token buffer (16) survive chunked decoding."""
    rng = np.random.default_rng(5)
    logits = _peaky_logits(rng, 200, small_vocab.size) * 3
    state = beam_init(2, 4)
    for start in range(0, 200, 16):
        state = beam_step(state, np.stack([logits[start : start + 16]] * 2), small_vocab)
    hyps = beam_results(state, small_vocab)
    greedy = greedy_decode(logits, small_vocab)
    assert len(greedy.tokens) > 16 and state.tokens.shape[2] >= len(greedy.tokens)
    assert hyps[0][0].tokens == hyps[1][0].tokens == greedy.tokens


def test_beam_reset_starts_a_new_segment_in_one_slot(small_vocab):
    rng = np.random.default_rng(13)
    first = rng.normal(size=(2, 40, small_vocab.size)) * 2.5
    second = rng.normal(size=(2, 24, small_vocab.size)) * 2.5
    state = beam_step(beam_init(2, 5), first, small_vocab)
    state = beam_reset(state, [1])
    state = beam_step(state, second, small_vocab)
    got = beam_results(state, small_vocab, words=True, time_offset=[0.0, 2.0])
    kept = prefix_beam_search(np.concatenate([first[0], second[0]]), small_vocab, 5)
    fresh = prefix_beam_search(second[1], small_vocab, 5, time_offset=2.0)
    _assert_same(got[0][0], kept[0])
    _assert_same(got[1][0], fresh[0])
    assert state.frames.tolist() == [64, 24]
    # once every slot has restarted, the old chunks' log-probs are released
    assert len(beam_reset(beam_reset(state, [0]), [1]).history) == 0
    assert len(beam_reset(state, [0]).history) == 1
