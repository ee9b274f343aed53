"""Real conversational text from the chitchat-dataset and chatterbot-corpus wheels (skipped with
the install command when a wheel is absent); read in place, never copied."""

from __future__ import annotations

import importlib.util

import pytest

from domains.dialogue.realtext import RealTextUnavailable, heldout_dialogues, package_dir, read_chatterbot, read_chitchat

needs_chitchat = pytest.mark.skipif(importlib.util.find_spec("chitchat_dataset") is None,
                                    reason="pip install --no-deps chitchat-dataset==0.9.0")
needs_chatterbot = pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None,
                                      reason="pip install --no-deps chatterbot-corpus==1.3.3")


def _alternating(messages):
    return [m["role"] for m in messages] == ["user" if i % 2 == 0 else "assistant" for i in range(len(messages))]


@needs_chitchat
def test_chitchat_conversations():
    convs = read_chitchat(limit=25, min_turns=4)
    assert len(convs) == 25 and len({c["id"] for c in convs}) == 25
    for c in convs:
        assert c["language"] == "en" and len(c["messages"]) >= 4 and _alternating(c["messages"])
        assert all(isinstance(m["content"], str) and m["content"] for m in c["messages"])
    # speakers' consecutive utterances are joined into one turn, so real text is preserved
    assert sum(len(m["content"]) for c in convs for m in c["messages"]) > 25 * 4 * 10


@needs_chatterbot
def test_chatterbot_conversations_in_five_of_the_seven_languages():
    with pytest.warns(UserWarning, match=r"en: left out 1 malformed.*trivia\.yml"):
        en = read_chatterbot("en")
    assert len(en) > 500 and all(_alternating(c["messages"]) for c in en)
    assert any("/health/" in c["id"] for c in en)  # the corpus's health topic is among them
    for lang in ("hi", "mr", "ta", "te", "bn"):
        convs = read_chatterbot(lang)
        assert convs and all(c["language"] == lang for c in convs)
    with pytest.raises(ValueError, match="malformed|expected a list"):
        read_chatterbot("en", on_malformed="raise")
    with pytest.raises(ValueError, match="no 'ar' text"):
        read_chatterbot("ar")
    assert len(heldout_dialogues("chatterbot", "hi", limit=3)) == 3


@needs_chatterbot
def test_heldout_split_of_the_datamodule():
    from domains.dialogue.data import DialogueData

    dm = DialogueData(n_dialogues=12, heldout="chatterbot", heldout_language="hi", heldout_limit=5, batch_size=2)
    dm.setup()
    assert len(dm.splits["heldout"]) == 5 and dm.split_sizes["heldout"] == 5
    batch = next(iter(dm.heldout_dataloader()))
    assert batch["meta"][0]["language"] == "hi" and batch["messages"][0][0]["role"] == "user"


def test_missing_wheel_is_a_clear_error():
    with pytest.raises(RealTextUnavailable, match="not installed"):
        package_dir("no_such_corpus_package")
