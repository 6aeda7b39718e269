"""In-context classification on a tiny random Llama (SmolLM2 tokenizer): the prefix cache,
batching with padding and the full-prompt baseline must all give the probabilities of an
independent reference that scores each (query, label) as one unpadded sequence."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erase.icl import InContextClassifier
from erase.prompt import PromptTemplate
from core.errors import UnlearnError

LABELS = ["add_to_playlist", "get_weather", "play_music"]  # verbalizers of 5, 3 and 2 tokens
EXAMPLES = [("jazz", "add_to_playlist"), ("will it rain in Paris?", "get_weather"), ("some rock", "play_music")]
QUERIES = ["hello", " ".join(f"word{i}" for i in range(60)), "one two", "z" * 30, "is it sunny"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two torch threads on two shared, busy cores spin-wait: 15x slower here than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clf(one_thread):
    return InContextClassifier("tiny-lm", labels=LABELS)


def reference(clf: InContextClassifier, examples, queries) -> np.ndarray:
    """Softmax over labels of the verbalizer log-likelihood, one full sequence per pair."""
    out = np.zeros((len(queries), len(clf.labels)))
    prefix = clf.prefix_ids(examples)
    for i, q in enumerate(queries):
        for l, verb in enumerate(clf.verb_ids):
            ids = prefix + clf.query_ids(q) + verb
            with torch.inference_mode():
                logp = torch.log_softmax(clf.model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
            start = len(ids) - len(verb)
            out[i, l] = sum(logp[start + t - 1, verb[t]].item() for t in range(len(verb)))
    out = np.exp(out - out.max(axis=1, keepdims=True))
    return out / out.sum(axis=1, keepdims=True)


def test_cache_batches_and_baseline_match_the_reference(clf):
    ref = reference(clf, EXAMPLES, QUERIES)
    assert ref.max(axis=1).min() < 0.999  # the tiny model is not saturated: a wrong score would show
    for use_cache in (True, False):
        for batch_size in (1, 2, 8):
            got = clf.predict_proba(EXAMPLES, QUERIES, use_cache=use_cache, batch_size=batch_size)
            assert got.shape == (len(QUERIES), len(LABELS))
            np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)
            np.testing.assert_allclose(got, ref, atol=1e-4, err_msg=f"use_cache={use_cache} batch={batch_size}")


def test_a_query_does_not_depend_on_its_batch(clf):
    alone = clf.predict_proba(EXAMPLES, ["hello"])
    together = clf.predict_proba(EXAMPLES, QUERIES, batch_size=len(QUERIES))
    np.testing.assert_allclose(together[0], alone[0], atol=1e-5)


def test_examples_change_the_prediction(clf):
    a = clf.predict_proba(EXAMPLES, QUERIES)
    b = clf.predict_proba(EXAMPLES[::-1], QUERIES)
    assert np.abs(a - b).max() > 1e-3


def test_zero_shot_and_single_token_verbalizers():
    clf = InContextClassifier("tiny-lm", labels=["pos", "neg"], verbalizers={"pos": " good", "neg": " bad"})
    assert all(len(v) == 1 for v in clf.verb_ids)
    for examples in ([], [("fine film", "pos"), ("dull", "neg")]):
        ref = reference(clf, examples, QUERIES)
        np.testing.assert_allclose(clf.predict_proba(examples, QUERIES, batch_size=3), ref, atol=1e-4)
        np.testing.assert_allclose(clf.predict_proba(examples, QUERIES, use_cache=False, batch_size=3), ref, atol=1e-4)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(queries=st.lists(st.text(alphabet="abc xyz?!", min_size=0, max_size=40), min_size=1, max_size=6),
       batch_size=st.integers(1, 4))
def test_cache_equals_full_prompt_on_random_batches(clf, queries, batch_size):
    cached = clf.predict_proba(EXAMPLES, queries, use_cache=True, batch_size=batch_size)
    full = clf.predict_proba(EXAMPLES, queries, use_cache=False, batch_size=len(queries))
    np.testing.assert_allclose(cached, full, atol=1e-4)


def test_long_texts_are_cut_to_fit_the_context():
    clf = InContextClassifier("tiny-lm", labels=LABELS, max_length=260, text_tokens=40)
    long_text = " ".join(f"w{i}" for i in range(500))
    examples = [(long_text, label) for label in LABELS * 3]  # 9 examples, far beyond 260 tokens
    prefix = clf.prefix_ids(examples)
    assert len(prefix) + clf.query_reserve <= 260
    assert len(clf.query_ids(long_text)) <= 40 + len(clf.query_ids(""))
    probs = clf.predict_proba(examples, [long_text, "short"])
    assert probs.shape == (2, 3) and np.isfinite(probs).all()
    with pytest.raises(UnlearnError, match="do not fit in max_length 260 even with one token"):
        clf.prefix_ids([("x", "get_weather")] * 200)


def test_template_is_used_for_examples_and_queries():
    template = PromptTemplate(instruction="Intents: {labels}\n", query="Q: {text}\nA:", separator="\n")
    clf = InContextClassifier("tiny-lm", labels=LABELS, template=template)
    text = clf.tokenizer.decode(clf.prefix_ids([("jazz", "play_music")]) + clf.query_ids("rain"))
    assert text == "Intents: add_to_playlist, get_weather, play_music\nQ: jazz\nA: play_music\nQ: rain\nA:"


@pytest.mark.parametrize("call, message", [
    (lambda c: c.predict_proba(EXAMPLES, []), "no queries to predict"),
    (lambda c: c.predict_proba(EXAMPLES, "one string"), "no queries to predict"),
    (lambda c: c.predict_proba([("x", "nope")], ["q"]), "example 0: unknown label 'nope'"),
    (lambda c: c.predict_proba([("x",)], ["q"]), "example 0: expected a (text, label) pair"),
    (lambda c: c.predict_proba(EXAMPLES, ["q"], batch_size=0), "batch_size must be >= 1"),
])
def test_bad_calls(clf, call, message):
    with pytest.raises(UnlearnError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(clf)


@pytest.mark.parametrize("kwargs, message", [
    ({"lm": "minilm", "labels": LABELS}, "not a causal language model (architectures: BertModel)"),
    ({"lm": "tiny-lm", "labels": ["a"]}, "labels must be at least two distinct"),
    ({"lm": "tiny-lm", "labels": ["a", "a"]}, "labels must be at least two distinct"),
    ({"lm": "tiny-lm", "labels": ["a", "b"], "verbalizers": {"a": " x"}}, "no verbalizer for label 'b'"),
    ({"lm": "tiny-lm", "labels": ["a", "b"], "verbalizers": {"a": " x", "b": " x"}}, "same verbalizer tokens"),
    ({"lm": "tiny-lm", "labels": ["a", "b"], "max_length": 10}, "too short for the instruction and one query"),
])
def test_bad_construction(kwargs, message):
    with pytest.raises(UnlearnError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        InContextClassifier(**kwargs)
    assert "\n" not in str(info.value)


def test_folder_without_a_model(tmp_path):
    with pytest.raises(UnlearnError, match="cannot load"):
        InContextClassifier(str(tmp_path), labels=LABELS)


def test_bad_template():
    with pytest.raises(UnlearnError, match="must contain {text} exactly once"):
        PromptTemplate(query="Label:")


def test_contextual_calibration_divides_out_the_content_free_prediction(clf):
    from erase.icl import CONTENT_FREE

    raw = clf.predict_proba(EXAMPLES, QUERIES)
    free = clf.predict_proba(EXAMPLES, list(CONTENT_FREE)).mean(axis=0)
    expected = raw / free
    expected /= expected.sum(axis=1, keepdims=True)
    got = clf.predict_proba(EXAMPLES, QUERIES, calibrate=True, batch_size=3)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-8)
    assert np.abs(got - raw).max() > 1e-3  # it did change something
