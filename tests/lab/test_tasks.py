"""The lab's generated language and tasks: labels recomputed here from the token classes, determinism, bad input."""

from __future__ import annotations

import pytest

from survey_utils.errors import SurveyError
from survey_utils.lab import tasks as T


def in_span(token: int, span: tuple[int, int]) -> bool:
    return span[0] <= token < span[0] + span[1]


@pytest.mark.parametrize("task", T.TASKS)
def test_lengths_and_label_ranges(task: str) -> None:
    batch = T.make_task(task, 200, seed=3)
    assert tuple(batch.input_ids.shape) == (200, T.task_length(task))
    assert 0 <= int(batch.labels.min()) and int(batch.labels.max()) < len(T.LABEL_TOKENS[task])
    assert int(batch.input_ids.max()) < T.VOCAB_SIZE
    # no input holds a label token of its own task (the answer is never in the question), except lookup's values
    if task != "lookup":
        assert not any(int(t) in T.LABEL_TOKENS[task] for t in batch.input_ids.flatten())


def test_sentiment_label_is_the_majority_polarity() -> None:
    batch = T.make_task("sentiment", 300, seed=1)
    for ids, label in zip(batch.input_ids.tolist(), batch.labels.tolist(), strict=True):
        negative = sum(in_span(t, T.NEGATIVE) for t in ids)
        positive = sum(in_span(t, T.POSITIVE) for t in ids)
        assert (negative + positive) % 2 == 1
        assert label == int(negative > positive)


def test_agreement_label_says_whether_the_verb_agrees() -> None:
    batch = T.make_task("agreement", 300, seed=2)
    for ids, label in zip(batch.input_ids.tolist(), batch.labels.tolist(), strict=True):
        noun, verb = ids[1 + T.VERB_POSITION - 1], ids[1 + T.VERB_POSITION]
        plural_noun, plural_verb = in_span(noun, T.NOUN_PLURAL), in_span(verb, T.VERB_PLURAL)
        assert in_span(noun, T.NOUN_SINGULAR) or plural_noun
        assert label == int(plural_noun != plural_verb)
    assert 0.4 < float(batch.labels.float().mean()) < 0.6


def test_lookup_label_is_the_value_after_the_queried_key() -> None:
    batch = T.make_task("lookup", 300, seed=4)
    for ids, label in zip(batch.input_ids.tolist(), batch.labels.tolist(), strict=True):
        pairs = dict(zip(ids[1:1 + 2 * T.LOOKUP_PAIRS:2], ids[2:2 + 2 * T.LOOKUP_PAIRS:2], strict=True))
        assert len(pairs) == T.LOOKUP_PAIRS  # distinct keys
        assert ids[-3] == T.QUERY
        assert pairs[ids[-2]] - T.VALUES[0] == label


def test_documents_follow_the_grammar_and_are_deterministic() -> None:
    docs = T.pretraining_documents(20, seed=5)
    assert tuple(docs.shape) == (20, T.DOCUMENT_LEN)
    assert docs.equal(T.pretraining_documents(20, seed=5))
    assert not docs.equal(T.pretraining_documents(20, seed=6))
    for doc in docs.tolist():
        assert doc[0] == T.BOS
        for i in range(1, len(doc) - 1):  # every verb follows a subject of its number
            if in_span(doc[i + 1], T.VERB_SINGULAR):
                assert in_span(doc[i], T.NOUN_SINGULAR)
            if in_span(doc[i + 1], T.VERB_PLURAL):
                assert in_span(doc[i], T.NOUN_PLURAL)


def test_splits_differ_and_repeat() -> None:
    a = T.make_task("sentiment", 50, seed=T.VALIDATION_OFFSET)
    assert a.input_ids.equal(T.make_task("sentiment", 50, seed=T.VALIDATION_OFFSET).input_ids)
    assert not a.input_ids.equal(T.make_task("sentiment", 50, seed=T.TEST_OFFSET).input_ids)


@pytest.mark.parametrize(("task", "n", "message"), [("sst2", 5, "'sst2'"), ("lookup", 0, "n=0")])
def test_bad_input_is_one_line(task: str, n: int, message: str) -> None:
    with pytest.raises(SurveyError, match=message):
        T.make_task(task, n)
