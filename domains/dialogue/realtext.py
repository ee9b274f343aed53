"""Real conversational text from two registry wheels, read in place (never copied or committed).

* ``chitchat-dataset==0.9.0`` (MIT; BYU Chit-Chat Challenge): ``chitchat_dataset/dataset.json``,
  7,168 English human-human chats, ``{id: {"messages": [[{"text", "sender", "timestamp"}, ...],
  ...], "prompt", "ratings", "start"}}``: each inner list is one speaker's turn of one or more
  utterances (joined with a space here); turns alternate between the two speakers.
* ``chatterbot-corpus==1.3.3`` (BSD-3): ``chatterbot_corpus/data/<language>/*.yml`` with
  ``conversations``: lists of alternating utterances. English (21 topics) plus Hindi, Marathi,
  Tamil, Telugu and Bengali; no Arabic.

Install both with ``pip install --no-deps chitchat-dataset==0.9.0 chatterbot-corpus==1.3.3``. The
packages are located with ``importlib.util.find_spec`` and never imported. The first speaker of
a conversation becomes ``user`` and the other ``assistant``, so perplexity over assistant turns is
measured on real replies. These are everyday conversations, not consultations: a held-out check
of how much general conversational English (and five of the seven languages) a fine-tuned model
keeps, not a measure of medical quality.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import yaml

CHITCHAT_PACKAGE, CHATTERBOT_PACKAGE = "chitchat_dataset", "chatterbot_corpus"
#: our language codes -> chatterbot-corpus folders (it has no Arabic)
CHATTERBOT_FOLDERS = {"en": "english", "hi": "hindi", "mr": "marathi", "ta": "tamil", "te": "telugu", "bn": "bengali"}


class RealTextUnavailable(FileNotFoundError):
    """The wheel holding the real text is not installed (says how to install it)."""


def package_dir(name: str) -> Path:
    """Folder of an installed top-level package, found without executing its ``__init__``."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        wheel = {CHITCHAT_PACKAGE: "chitchat-dataset==0.9.0", CHATTERBOT_PACKAGE: "chatterbot-corpus==1.3.3"}.get(name, name)
        raise RealTextUnavailable(f"package {name!r} is not installed: pip install --no-deps {wheel}")
    return Path(next(iter(spec.submodule_search_locations)))


def _messages(utterances: list[str]) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": u} for i, u in enumerate(utterances)]


def read_chitchat(limit: int | None = None, min_turns: int = 2) -> list[dict[str, Any]]:
    """Chitchat conversations with at least ``min_turns`` turns, in file order (first ``limit``).

    Returns ``[{"id", "language": "en", "source": "chitchat", "messages": [...]}]``. A turn whose
    utterances are not all text, or two consecutive turns by one speaker, is an error.
    """
    path = package_dir(CHITCHAT_PACKAGE) / "dataset.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for cid, conv in data.items():
        turns, senders = [], []
        for t, turn in enumerate(conv.get("messages") or []):
            if not turn or not all(isinstance(u, dict) and isinstance(u.get("text"), str) for u in turn):
                raise ValueError(f"{path}: conversation {cid!r} turn {t}: expected a list of {{'text': str, 'sender'}}")
            senders.append(turn[0].get("sender"))
            turns.append(" ".join(u["text"].strip() for u in turn))
        if any(a == b for a, b in zip(senders, senders[1:])):
            raise ValueError(f"{path}: conversation {cid!r}: two consecutive turns by one speaker")
        if len(turns) >= min_turns:
            out.append({"id": f"chitchat:{cid}", "language": "en", "source": "chitchat", "messages": _messages(turns)})
            if limit is not None and len(out) >= limit:
                break
    return out


def read_chatterbot(language: str = "en", min_turns: int = 2, on_malformed: str = "skip") -> list[dict[str, Any]]:
    """Chatterbot-corpus conversations of one language (all topic files, sorted).

    A few conversations in the wheel are single strings where YAML lost the list (e.g. one in
    english/trivia.yml); ``on_malformed="skip"`` leaves them out and warns with their count and
    files, ``"raise"`` refuses the file.
    """
    if language not in CHATTERBOT_FOLDERS:
        raise ValueError(f"chatterbot-corpus has no {language!r} text; it has {sorted(CHATTERBOT_FOLDERS)}")
    if on_malformed not in ("skip", "raise"):
        raise ValueError(f"on_malformed must be 'skip' or 'raise', got {on_malformed!r}")
    folder = package_dir(CHATTERBOT_PACKAGE) / "data" / CHATTERBOT_FOLDERS[language]
    out, skipped = [], []
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for f in sorted(folder.glob("*.yml")):
        doc = yaml.load(f.read_text(encoding="utf-8"), Loader=loader) or {}
        for k, conv in enumerate(doc.get("conversations") or []):
            if not isinstance(conv, list) or not all(isinstance(u, str) for u in conv):
                if on_malformed == "raise":
                    raise ValueError(f"{f}: conversation {k}: expected a list of utterances, got {conv!r:.60}")
                skipped.append(f"{f.name}:{k}")
                continue
            if len(conv) >= min_turns:
                out.append({"id": f"chatterbot:{language}/{f.stem}/{k}", "language": language, "source": "chatterbot",
                            "messages": _messages([u.strip() for u in conv])})
    if skipped:
        warnings.warn(f"chatterbot-corpus {language}: left out {len(skipped)} malformed conversation(s): {skipped}",
                      stacklevel=2)
    return out


def heldout_dialogues(source: str, language: str = "en", limit: int | None = None) -> list[dict[str, Any]]:
    """Real held-out conversations: ``source`` is ``chitchat`` or ``chatterbot``."""
    if source == "chitchat":
        return read_chitchat(limit)
    if source == "chatterbot":
        convs = read_chatterbot(language)
        return convs[:limit] if limit is not None else convs
    raise ValueError(f"source must be 'chitchat' or 'chatterbot', got {source!r}")
