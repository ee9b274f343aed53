"""Dialogue data: readers on tiny files in exactly their layouts (MDDial JSON, MedAidDialog-style
JSON, chat JSONL), bad input, pre-context serialisation and dropout, and the DataModule's splits."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from domains.dialogue.data import (
    DialogueData,
    DialogueDataset,
    DialogueFormatError,
    EpochTaggedSampler,
    read_chat_jsonl,
    read_medaid_json,
    serialize_pre_context,
    system_prompt,
    to_messages,
    write_chat_jsonl,
)
from domains.dialogue.kb import LANGUAGES, load_kb
from domains.dialogue.metrics import parse_diagnosis

# MDDial's layout (data/train.json of the MDDial repository): "Dialog N" -> disease_tag,
# symptoms_by_doctor_dialog {name: answer}, dialogs [{patient, doctor}], the patient text ending
# in ", Doctor: ?"; the answers are MDDial's fixed phrases
MDDIAL = {
    "Dialog 1": {
        "disease_tag": "Pneumonia",
        "symptoms_by_doctor_dialog": {"Fever": "Yes Doctor, I am feeling that as well", "Runny nose": "Not that I know of"},
        "dialogs": [
            {"patient": "Hi Doctor, I am having Cough, Doctor: ?", "doctor": "Oh, do you have any Fever?"},
            {"patient": "Yes, sometimes, Doctor: ?", "doctor": "What about Runny nose?"},
            {"patient": "Well not in my knowledge, Doctor: ?", "doctor": "In that case, you have Pneumonia."},
        ],
    },
    "Dialog 2": {
        "disease_tag": "Esophagitis",
        "symptoms_by_doctor_dialog": {"Thin white moss": "No, I don't have that", "Hematemesis": "Yes most of the times"},
        "dialogs": [
            {"patient": "I have been feeling Acid reflux, Doctor: ?", "doctor": "Is it? Then do you experience Thin white moss?"},
            {"patient": "No, I never had anything like that., Doctor: ?", "doctor": "What about Hematemesis?"},
            {"patient": "I am experiencing that sometimes, Doctor: ?", "doctor": "I believe you are having Esophagitis."},
        ],
    },
}

# the MedAidDialog-style extension: dialogue_id shared by translations, language, pre_context, turns
MEDAID = [
    {"dialogue_id": "p7", "language": "en", "disease_tag": "Mastitis",
     "pre_context": {"age": 29, "gender": "female", "allergies": ["penicillin"], "medications": []},
     "turns": [{"role": "patient", "text": "Doctor, I have breast pain and fever."},
               {"role": "doctor", "text": "Do you have a red area on the breast?"},
               {"role": "patient", "text": "Yes."},
               {"role": "doctor", "text": "This is most likely mastitis. The safer choice for you is erythromycin."}]},
    {"dialogue_id": "p7", "language": "hi", "disease_tag": "Mastitis",
     "pre_context": {"age": 29, "sex": "female", "allergies": ["penicillin"], "medications": []},
     "turns": [{"role": "patient", "text": "डॉक्टर, मुझे स्तन में दर्द और बुखार है।"},
               {"role": "doctor", "text": "आपके लक्षण स्तनशोथ की ओर इशारा करते हैं।"}]},
]


def _write(tmp_path, data, name="d.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return p


def test_mddial_reader(tmp_path):
    d1, d2 = read_medaid_json(_write(tmp_path, MDDIAL))
    assert (d1.dialogue_id, d1.language, d1.disease) == ("Dialog 1", "en", "pneumonia")
    assert [t.role for t in d1.turns] == ["patient", "doctor"] * 3  # no turn lost
    assert d1.turns[0].text == "Hi Doctor, I am having Cough" and d1.turns[2].text == "Yes, sometimes"
    assert d1.asked == {"fever": True, "runny_nose": False}
    assert d1.volunteered == ["cough"] and d1.symptoms == ["cough", "fever"]
    assert d1.red_flag is False and d1.context_dependent is False and d1.pre_context is None
    assert parse_diagnosis(d1.turns[-1].text, "en") == "pneumonia"
    # an MDDial symptom without a knowledge-base counterpart is kept, not dropped
    assert d2.asked == {"thin white moss": False, "vomiting_blood": True}
    assert d2.red_flag is True and d2.red_flag_reasons == ["vomiting_blood"]  # haematemesis is a red flag here
    kept = read_medaid_json(_write(tmp_path, MDDIAL), strip_mddial_artifact=False)
    assert kept[0].turns[0].text.endswith(", Doctor: ?")


def test_medaid_reader_and_messages(tmp_path):
    en, hi = read_medaid_json(_write(tmp_path, MEDAID))
    assert en.dialogue_id == hi.dialogue_id == "p7" and (en.language, hi.language) == ("en", "hi")
    assert en.pre_context == {"age": 29, "sex": "female", "allergies": ["penicillin"], "medications": []}
    assert en.symptoms == ["breast_pain", "fever"] and hi.volunteered == ["breast_pain", "fever"]
    msgs = to_messages(en, "given")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert "Allergies: penicillin" in msgs[0]["content"] and msgs[1]["content"].startswith("Doctor, I have")
    blind = to_messages(en, "blind")
    assert "Patient information" not in blind[0]["content"] and blind[1:] == msgs[1:]


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda r: r["turns"][1].update(role="nurse"), r"turns\[1\]\.role.*\"patient\" or \"doctor\""),
        (lambda r: r["turns"][2].pop("text"), r"turns\[2\]\.text.*non-empty string"),
        (lambda r: r["turns"].clear(), r"'turns'.*non-empty list"),
        (lambda r: r["pre_context"].update(age="29"), r"pre_context\.age.*integer"),
        (lambda r: r["pre_context"].update(weight=70), r"'pre_context'.*only the keys"),
        (lambda r: r["pre_context"].update(allergies="penicillin"), r"pre_context\.allergies.*list of strings"),
        (lambda r: r.update(dialogs=[]), r"either 'turns'.*or 'dialogs'"),
        (lambda r: r.update(language=7), r"'language'.*string"),
        (lambda r: r.update(red_flag="yes"), r"'red_flag'.*true, false"),
    ],
)
def test_medaid_reader_refuses_bad_records(tmp_path, edit, field):
    bad = copy.deepcopy(MEDAID)
    edit(bad[0])
    path = _write(tmp_path, bad)
    with pytest.raises(DialogueFormatError, match=field) as err:
        read_medaid_json(path)
    assert str(path) in str(err.value) and "dialogue 'Dialog 1'" in str(err.value)


def test_mddial_reader_refuses_bad_pairs_and_answers(tmp_path):
    bad = copy.deepcopy(MDDIAL)
    bad["Dialog 2"]["dialogs"][1] = {"patient": "Yes"}  # the doctor's reply is missing
    with pytest.raises(DialogueFormatError, match=r"'Dialog 2'.*dialogs\[1\].*exactly \"patient\" and \"doctor\""):
        read_medaid_json(_write(tmp_path, bad))
    bad = copy.deepcopy(MDDIAL)
    bad["Dialog 1"]["symptoms_by_doctor_dialog"]["Fever"] = "Maybe"  # no guessing
    with pytest.raises(DialogueFormatError, match=r"symptoms_by_doctor_dialog\['Fever'\].*MDDial's answers"):
        read_medaid_json(_write(tmp_path, bad))
    bad = copy.deepcopy(MDDIAL)
    bad["Dialog 1"]["dialogs"][0]["patient"] = ", Doctor: ?"  # nothing left after the artefact
    with pytest.raises(DialogueFormatError, match=r"dialogs\[0\]\.patient"):
        read_medaid_json(_write(tmp_path, bad))
    (tmp_path / "broken.json").write_text('{"Dialog 1": ', encoding="utf-8")
    with pytest.raises(DialogueFormatError, match=r"broken\.json.*valid JSON"):
        read_medaid_json(tmp_path / "broken.json")


CHAT = [
    {"messages": [{"role": "system", "content": "You are a doctor."},
                  {"role": "user", "content": "I have a cough."},
                  {"role": "assistant", "content": "Do you have fever?", "weight": 0},
                  {"role": "user", "content": "No."},
                  {"role": "assistant", "content": "This is most likely asthma."}]},
    {"messages": [{"role": "user", "content": "मुझे बुखार है।"}, {"role": "assistant", "content": "क्या आपको खांसी है?"}],
     "metadata": {"dialogue_id": "x1", "language": "hi", "disease_tag": "Pneumonia", "red_flag": False}},
]


def _jsonl(tmp_path, rows, name="c.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                 encoding="utf-8")
    return p


def test_chat_jsonl_reader(tmp_path):
    a, b = read_chat_jsonl(_jsonl(tmp_path, CHAT))
    assert a.system == "You are a doctor." and a.language == "und" and a.dialogue_id == "c.jsonl:1"
    assert [t.role for t in a.turns] == ["patient", "doctor", "patient", "doctor"]
    msgs = to_messages(a)
    assert msgs == CHAT[0]["messages"]  # verbatim, weight kept
    assert (b.dialogue_id, b.language, b.disease, b.volunteered) == ("x1", "hi", "pneumonia", ["fever"])


@pytest.mark.parametrize(
    "row, field",
    [
        ('{"messages": [', r"line 2.*one JSON object per line"),
        ({"messages": []}, r"'messages'.*non-empty list"),
        ({"messages": [{"role": "tool", "content": "42"}]}, r"messages\[0\]\.role"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]}, r"messages\[1\]\.role.*first"),
        ({"messages": [{"role": "user", "content": ""}]}, r"messages\[0\]\.content.*non-empty"),
        ({"messages": [{"role": "user", "content": "a", "weight": 0}]}, r"messages\[0\]\.weight"),
        ({"messages": [{"role": "assistant", "content": "a", "tool_calls": []}]}, r"tool_calls"),
        ({"messages": [{"role": "system", "content": "only a system prompt"}]}, r"at least one user or assistant"),
    ],
)
def test_chat_jsonl_refuses_bad_lines(tmp_path, row, field):
    path = _jsonl(tmp_path, [CHAT[1], row])
    with pytest.raises(DialogueFormatError, match=field) as err:
        read_chat_jsonl(path)
    assert str(path) in str(err.value) and "line 2" in str(err.value)


def test_pre_context_serialisation_is_deterministic_per_language():
    pc = {"age": 34, "sex": "female", "allergies": ["penicillin"], "chronic_conditions": [],
          "medications": ["warfarin", "metformin"]}
    shuffled = dict(reversed(list(pc.items())))
    assert serialize_pre_context(pc, "en") == serialize_pre_context(shuffled, "en") == (
        "Patient information:\nAge: 34\nSex: female\nAllergies: penicillin\nChronic conditions: none\n"
        "Current medications: warfarin and metformin")
    ar = serialize_pre_context(pc, "ar").split("\n")
    assert ar[0] == "معلومات المريض:" and ar[2] == "الجنس: أنثى" and ar[5] == "الأدوية الحالية: الوارفارين والميتفورمين"
    hi = serialize_pre_context(pc, "hi")
    assert "एलर्जी: पेनिसिलिन" in hi and "पुरानी बीमारियाँ: कोई नहीं" in hi
    # a field that is not given is not mentioned; free text unknown to the knowledge base is kept
    assert serialize_pre_context({"allergies": ["shellfish"]}, "en") == "Patient information:\nAllergies: shellfish"
    texts = {serialize_pre_context(pc, lang) for lang in LANGUAGES}
    assert len(texts) == len(LANGUAGES)
    assert system_prompt(None, "ta") == load_kb().block("ta")["system"]
    assert serialize_pre_context(None, "en") == serialize_pre_context({}, "en") == ""


@pytest.fixture(scope="module")
def dm():
    data = DialogueData(n_dialogues=24, precontext_dropout=0.3, batch_size=4, seed=1)
    data.setup()
    return data


def test_split_is_by_dialogue_id_across_languages(dm):
    by_split = {}
    for name in ("train", "val", "test"):
        ds = dm.splits[name]
        ids = {d.dialogue_id for d in ds.dialogues}
        assert all(sum(d.dialogue_id == i for d in ds.dialogues) == len(LANGUAGES) for i in ids)  # all 7 together
        by_split[name] = ids
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])
    assert sum(map(len, by_split.values())) == 24
    assert sum(dm.split_sizes.values()) == 24 * len(LANGUAGES) and set(dm.split_hashes) == {"train", "val", "test"}
    again = DialogueData(n_dialogues=24)
    again.setup()
    assert again.split_hashes == dm.split_hashes  # same seed, same split, read from the cache
    other = DialogueData(n_dialogues=24, split_seed=1)
    other.setup()
    assert other.split_hashes != dm.split_hashes


def test_language_filter_and_eval_modes():
    dm = DialogueData(n_dialogues=24, languages=["en", "ar"], eval_pre_context=["given", "asked", "blind"])
    dm.setup()
    ds = dm.splits["val"]
    assert {d.language for d in ds.dialogues} == {"en", "ar"}
    with_pc = sum(bool(d.pre_context) for d in ds.dialogues)
    assert len(ds) == 3 * with_pc + (len(ds.dialogues) - with_pc)
    modes = [ds[i]["meta"]["pre_context_mode"] for i in range(len(ds))]
    assert modes.count("none") == len(ds.dialogues) - with_pc and modes.count("asked") == with_pc
    with pytest.raises(ValueError, match="not generated"):
        DialogueData(languages=["fr"])


def test_pre_context_dropout_rate_and_reproducibility(dm):
    ds = dm.splits["train"]
    eligible = [i for i in range(len(ds)) if ds.dialogues[ds.index[i][0]].pre_context]
    decisions = np.array([[ds.dropped(i, e) for i in eligible] for e in range(8)])
    assert abs(decisions.mean() - 0.3) < 0.06, decisions.mean()  # ~8 x 100 draws: std 0.016
    twin = DialogueDataset(ds.dialogues, precontext_dropout=0.3, seed=1)
    assert all(twin.dropped(i, 3) == ds.dropped(i, 3) for i in eligible)  # a resumed run drops the same
    assert (decisions[0] != decisions[1]).any()  # and a new epoch draws anew
    # without a pre-context nothing is dropped; with rate 0 nothing either
    assert all(ds.mode(i, 0) == "none" for i in range(len(ds)) if i not in set(eligible))
    assert all(DialogueDataset(ds.dialogues, precontext_dropout=0.0).mode(i) in ("given", "none") for i in eligible)


def test_dropped_item_asks_for_the_pre_context(dm):
    ds = dm.splits["train"]
    epoch = 2
    i = next(i for i in range(len(ds)) if ds.dialogues[ds.index[i][0]].pre_context and ds.dropped(i, epoch)
             and ds.dialogues[ds.index[i][0]].language == "en")
    item, kept = ds[(epoch, i)], ds[(0, i)] if not ds.dropped(i, 0) else None
    assert item["meta"]["pre_context_mode"] == "asked" and item["meta"]["pre_context"] is None
    assert "Patient information" not in item["messages"][0]["content"]
    doctor = [m["content"] for m in item["messages"] if m["role"] == "assistant"]
    assert any("allerg" in t for t in doctor) and any("regular" in t for t in doctor)
    if kept is not None:
        assert "Patient information" in kept["messages"][0]["content"]
    # the loader's sampler tags indices with the epoch Lightning sets, so the dataset sees it
    sampler = EpochTaggedSampler(len(ds), seed=1)
    sampler.set_epoch(epoch)
    keys = list(sampler)
    assert {e for e, _ in keys} == {epoch} and sorted(j for _, j in keys) == list(range(len(ds)))


def test_train_loader_follows_the_epoch(dm):
    """What the loader yields in epoch e is what the dataset decides for (e, item): a run resumed
    at epoch e sees the same pre-context drops as one that got there without stopping."""
    loader, ds = dm.train_dataloader(), dm.splits["train"]
    seen = {}
    for epoch in (0, 3):
        loader.sampler.set_epoch(epoch)  # what Lightning does at the start of every epoch
        modes = {m["item_id"]: m["pre_context_mode"] for b in loader for m in b["meta"]}
        assert modes == {ds.ids[i]: ds.mode(i, epoch) for i in range(len(ds))}
        seen[epoch] = modes
    assert seen[0] != seen[3]


def test_train_loader_batches_chat_items(dm):
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["messages"]) == len(batch["meta"]) == 4
    for msgs, meta in zip(batch["messages"], batch["meta"]):
        assert msgs[0]["role"] == "system" and msgs[-1]["role"] == "assistant"
        assert all(m["role"] in ("user", "assistant") for m in msgs[1:])
        assert meta["language"] in LANGUAGES and meta["disease"] in load_kb().disease_ids
        assert isinstance(meta["red_flag"], bool) and isinstance(meta["context_dependent"], bool)


def test_file_sources_use_the_same_reader(tmp_path, dm):
    dialogues = dm.splits["train"].dialogues + dm.splits["val"].dialogues
    path = tmp_path / "export.jsonl"
    write_chat_jsonl(dialogues, path)
    back = read_chat_jsonl(path)
    assert [to_messages(d) for d in back] == [to_messages(d) for d in dialogues]
    assert [(b.dialogue_id, b.disease, b.symptoms, b.red_flag) for b in back] == [
        (d.dialogue_id, d.disease, d.symptoms, d.red_flag) for d in dialogues]
    chat = DialogueData(source="chat_jsonl", path=str(path))
    chat.setup()
    assert sum(chat.split_sizes.values()) == len(dialogues)
    # MedAid JSON by split files; val is carved from train by dialogue id when absent
    train, test = _write(tmp_path, MDDIAL, "train.json"), _write(tmp_path, MEDAID, "test.json")
    files = DialogueData(source="medaid_json", path={"train": str(train), "test": str(test)}, fractions={"train": 0.5, "val": 0.5})
    files.setup()
    assert files.split_sizes == {"train": 1, "val": 1, "test": 2}
    with pytest.raises(ValueError, match="needs `path`"):
        DialogueData(source="medaid_json")
