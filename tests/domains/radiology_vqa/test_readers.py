"""Readers on tiny files written in exactly the published layouts, and their errors on bad input."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from domains.radiology_vqa.readers import (
    IMAGE_TOKEN,
    RadiologyDataError,
    mimic_vqa_records,
    read_llava,
    read_mimic_cxr,
    read_slake,
    read_vqa_rad,
)


def _jpg(path, value=128, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8), "L").save(path)


# ---------------------------------------------------------------------------------------------
def _llava_entries():
    return [
        {"id": "q1", "image": "imgs/a.jpg", "gender": "F", "anchor_age": 70, "race_major": "black or african american",
         "subject_id": 11, "answer_type": "CLOSED", "question_type": "cardiomegaly",
         "conversations": [{"from": "human", "value": "Is the heart enlarged?\n<image>"}, {"from": "gpt", "value": "yes"}]},
        {"id": 2, "image": "imgs/b.jpg", "gender": "male", "anchor_age_group": 0, "race_major": "unknown",
         "conversations": [{"from": "human", "value": "<image>\nDescribe the findings."},
                           {"from": "gpt", "value": "No acute process."},
                           {"from": "human", "value": "Any effusion?"}, {"from": "gpt", "value": "no"}]},
    ]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_llava_json_and_jsonl(tmp_path, suffix):
    for n in ("a", "b"):
        _jpg(tmp_path / "imgs" / f"{n}.jpg")
    path = tmp_path / f"chat{suffix}"
    entries = _llava_entries()
    path.write_text(json.dumps(entries) if suffix == ".json" else "\n".join(json.dumps(e) for e in entries))
    a, b = read_llava(path)
    assert a.messages[0] == {"role": "user", "content": f"{IMAGE_TOKEN}\nIs the heart enlarged?"}  # placeholder moved first
    assert a.messages[1] == {"role": "assistant", "content": "yes"}
    assert (a.question, a.answer, a.question_type, a.topic) == ("Is the heart enlarged?", "yes", "closed", "cardiomegaly")
    assert a.groups == {"age": ">65", "sex": "female", "race": "Black"} and a.patient_id == "11"
    assert a.image == tmp_path / "imgs" / "a.jpg" and all(math.isnan(v) for v in a.findings.values())
    # no answer_type: inferred open; four turns kept; anchor_age_group 0 -> "<45"; unknown race -> ''
    assert b.question_type == "open" and len(b.messages) == 4 and b.answer == "No acute process."
    assert b.groups == {"age": "<45", "sex": "male", "race": ""} and b.id == "2" and b.patient_id == "imgs/b.jpg"


@pytest.mark.parametrize("change, field", [
    (lambda e: e.pop("conversations"), "conversations"),
    (lambda e: e["conversations"][1].update({"from": "assistant"}), r"conversations\[1\]"),
    (lambda e: e["conversations"][0].update({"value": "no placeholder"}), r"conversations\[0\]\.value"),
    (lambda e: e["conversations"][0].update({"value": "<image> <image> twice"}), r"conversations\[0\]\.value"),
    (lambda e: e.update({"image": "imgs/missing.jpg"}), "image"),
    (lambda e: e.update({"gender": "X"}), "gender"),
    (lambda e: e.update({"anchor_age": "old"}), "anchor_age"),
    (lambda e: e.update({"race_major": "martian"}), "race_major"),
    (lambda e: e.update({"answer_type": "MAYBE"}), "answer_type"),
    (lambda e: e.update({"findings": {"fracture": 1}}), "findings"),
])
def test_llava_bad_input_names_file_field_and_form(tmp_path, change, field):
    _jpg(tmp_path / "imgs" / "a.jpg")
    entry = _llava_entries()[0]
    change(entry)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([entry]))
    with pytest.raises(RadiologyDataError, match=rf"bad\.json \(entry 0\): field '{field}': expected"):
        read_llava(path)
    assert issubclass(RadiologyDataError, ValueError)


def test_not_json_is_a_clear_error(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[{oops")
    with pytest.raises(RadiologyDataError, match=r"x\.json: field '\(file\)': expected a JSON list"):
        read_llava(path)


# ---------------------------------------------------------------------------------------------
def test_vqa_rad_public_json(tmp_path):
    _jpg(tmp_path / "VQA_RAD Image Folder" / "synpic54610.jpg")
    entries = [  # field names and quirks of VQA_RAD Dataset Public.json: numeric answers, stray spaces
        {"qid": "0", "phrase_type": "freeform", "qid_linked_id": "03f451ca-de62-4617-9679-e836026a7642",
         "image_case_url": "https://medpix.nlm.nih.gov/case?id=48e1dd0e-8552-46ad-a354-5eb55be86de6",
         "image_name": "synpic54610.jpg", "image_organ": "HEAD", "evaluation": "not evaluated",
         "question": "Are regions of the brain infarcted?", "question_rephrase": "NULL", "question_relation": "NULL",
         "question_frame": "NULL", "question_type": "PRES", "answer": "Yes", "answer_type": "CLOSED"},
        {"qid": "1", "image_name": "synpic54610.jpg", "question": "How many lesions?", "question_type": "COUNT",
         "answer": 2, "answer_type": "OPEN ", "image_organ": "HEAD"},
    ]
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps(entries))
    a, b = read_vqa_rad(tmp_path / "VQA_RAD Dataset Public.json")
    assert (a.question_type, a.answer, a.topic, a.patient_id) == ("closed", "Yes", "PRES", "synpic54610.jpg")
    assert (b.question_type, b.answer, b.id) == ("open", "2", "1")
    assert a.messages[0]["content"] == f"{IMAGE_TOKEN}\nAre regions of the brain infarcted?"
    assert a.groups == {"age": "", "sex": "", "race": ""}
    entries[1]["answer_type"] = "MAYBE"
    (tmp_path / "bad.json").write_text(json.dumps(entries))
    with pytest.raises(RadiologyDataError, match=r"bad\.json \(entry 1\): field 'answer_type': expected CLOSED or OPEN, "
                                                 r"got 'MAYBE'"):
        read_vqa_rad(tmp_path / "bad.json", tmp_path / "VQA_RAD Image Folder")
    del entries[1]["image_name"]
    (tmp_path / "bad.json").write_text(json.dumps(entries))
    with pytest.raises(RadiologyDataError, match=r"field 'image_name': expected present"):
        read_vqa_rad(tmp_path / "bad.json", tmp_path / "VQA_RAD Image Folder")


def test_slake_reads_one_language(tmp_path):
    _jpg(tmp_path / "imgs" / "xmlab1" / "source.jpg")
    base = {"img_id": 1, "img_name": "xmlab1/source.jpg", "location": "Lung", "modality": "X-Ray",
            "base_type": "vqa", "triple": ["vhead", "_", "_"]}
    entries = [
        {**base, "qid": 10, "question": "Is the lung healthy?", "answer": "No", "answer_type": "CLOSED", "q_lang": "en",
         "content_type": "Abnormality"},
        {**base, "qid": 11, "question": "肺部健康吗?", "answer": "不", "answer_type": "CLOSED", "q_lang": "zh",
         "content_type": "Abnormality"},
        {**base, "qid": 12, "question": "Where is the abnormality?", "answer": "Right Lung, Lower Left",
         "answer_type": "OPEN", "q_lang": "en", "content_type": "Position"},
    ]
    (tmp_path / "train.json").write_text(json.dumps(entries, ensure_ascii=False))
    en = read_slake(tmp_path / "train.json")
    assert [r.id for r in en] == ["10", "12"] and en[1].question_type == "open" and en[0].patient_id == "1"
    assert [r.id for r in read_slake(tmp_path / "train.json", lang="zh")] == ["11"]
    entries[0]["q_lang"] = "fr"
    (tmp_path / "train.json").write_text(json.dumps(entries))
    with pytest.raises(RadiologyDataError, match=r"train\.json \(entry 0\): field 'q_lang': expected en or zh, got 'fr'"):
        read_slake(tmp_path / "train.json")


# ---------------------------------------------------------------------------------------------
META_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
                "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                "PatientOrientationCodeSequence_CodeMeaning"]
CHEXPERT = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion",
            "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"]


def _mimic_tree(root):
    """Two subjects, three studies, four images (one lateral), official file names (metadata gzipped)."""
    images = [("d1", 10000032, 50414267, "PA"), ("d2", 10000032, 50414267, "LATERAL"), ("d3", 10000032, 53189527, "AP"),
              ("d4", 12345678, 55555555, "PA")]
    meta = pd.DataFrame([[d, s, st, "CHEST (PA AND LAT)", v, 16, 16, 21800506, 213014.531, "CHEST (PA AND LAT)",
                          "postero-anterior", "Erect"] for d, s, st, v in images], columns=META_COLUMNS)
    with gzip.open(root / "mimic-cxr-2.0.0-metadata.csv.gz", "wt") as f:
        meta.to_csv(f, index=False)
    labels = pd.DataFrame([[10000032, 50414267] + [None] * 14, [10000032, 53189527] + [None] * 14,
                           [12345678, 55555555] + [None] * 14], columns=["subject_id", "study_id", *CHEXPERT])
    labels.loc[0, ["Cardiomegaly", "Pleural Effusion", "Pneumonia", "Pneumothorax"]] = [1.0, -1.0, 0.0, 0.0]
    labels.loc[1, ["No Finding"]] = [1.0]  # blanks become negatives
    labels.loc[2, ["Lung Opacity", "Consolidation"]] = [-1.0, 1.0]  # opacity: any of its columns positive
    labels.to_csv(root / "mimic-cxr-2.0.0-chexpert.csv", index=False)
    pd.DataFrame({"dicom_id": ["d1", "d2", "d3", "d4"], "study_id": [50414267, 50414267, 53189527, 55555555],
                  "subject_id": [10000032, 10000032, 10000032, 12345678],
                  "split": ["train", "train", "validate", "test"]}).to_csv(root / "mimic-cxr-2.0.0-split.csv", index=False)
    for d, s, st, _ in images:
        _jpg(root / f"files/p{str(s)[:2]}/p{s}/s{st}/{d}.jpg")
    (root / "files/p10/p10000032/s50414267.txt").write_text(
        "                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n INDICATION:  cough\n\n"
        " FINDINGS:\n\n The heart is enlarged.\n No pneumothorax.\n\n IMPRESSION:\n\n Cardiomegaly.\n")
    pd.DataFrame({"subject_id": [10000032, 12345678], "gender": ["F", "M"], "anchor_age": [52, 30],
                  "race": ["WHITE - OTHER EUROPEAN", "ASIAN - CHINESE"]}).to_csv(root / "demographics.csv", index=False)
    return root


def test_mimic_cxr_jpg_layout(tmp_path):
    root = _mimic_tree(tmp_path)
    df = read_mimic_cxr(root, root / "demographics.csv")
    assert list(df["dicom_id"]) == ["d1", "d3", "d4"]  # frontal views only
    assert df.loc[0, "path"] == root / "files/p10/p10000032/s50414267/d1.jpg"
    d1, d3, d4 = (df.iloc[i] for i in range(3))
    assert (d1["cardiomegaly"], d1["opacity"], d1["pneumothorax"]) == (1.0, 0.0, 0.0) and math.isnan(d1["effusion"])
    assert all(d3[f] == 0.0 for f in ("cardiomegaly", "effusion", "opacity", "pneumothorax"))  # No Finding
    assert d4["opacity"] == 1.0 and math.isnan(d4["cardiomegaly"])
    assert list(df["split"]) == ["train", "val", "test"]
    assert (d1["age"], d1["sex"], d1["race"]) == ("45-65", "female", "White") and d4["race"] == "Asian"
    assert d1["report"].is_file() and not d3["report"].is_file()


def test_mimic_templated_questions_skip_unknown_findings(tmp_path):
    root = _mimic_tree(tmp_path)
    df = read_mimic_cxr(root, root / "demographics.csv")
    records = mimic_vqa_records(df, seed=0)
    d1 = [r for r in records if r.id.startswith("d1-")]
    topics = {r.topic for r in d1}
    assert "effusion" not in topics and "abnormality" not in topics  # effusion uncertain: nothing asked
    assert {"cardiomegaly", "opacity", "pneumothorax"} <= topics
    assert next(r for r in d1 if r.topic == "cardiomegaly").answer == "yes"
    assert all(r.patient_id == "10000032" and r.groups["sex"] == "female" for r in d1)
    d3 = [r for r in records if r.id.startswith("d3-")]
    assert next(r for r in d3 if r.topic == "abnormality").answer == "no acute abnormality"


def test_mimic_with_a_llava_qa_file(tmp_path):
    root = _mimic_tree(tmp_path)
    df = read_mimic_cxr(root, root / "demographics.csv")
    qa = [{"id": "x", "image": "files/p12/p12345678/s55555555/d4.jpg",
           "conversations": [{"from": "human", "value": "<image>\nIs there consolidation?"}, {"from": "gpt", "value": "yes"}]}]
    (root / "qa.json").write_text(json.dumps(qa))
    (rec,) = mimic_vqa_records(df, root / "qa.json", root)
    assert rec.patient_id == "12345678" and rec.groups["race"] == "Asian" and rec.findings["opacity"] == 1.0
    qa[0]["image"] = "files/p10/p10000032/s50414267/d2.jpg"  # the lateral view is not among the images read
    (root / "qa.json").write_text(json.dumps(qa))
    with pytest.raises(RadiologyDataError, match=r"qa\.json: field 'image': expected an image of the MIMIC-CXR-JPG metadata"):
        mimic_vqa_records(df, root / "qa.json", root)


def test_mimic_bad_inputs(tmp_path):
    root = _mimic_tree(tmp_path)
    demo = pd.read_csv(root / "demographics.csv")
    demo.iloc[:1].to_csv(root / "short.csv", index=False)
    with pytest.raises(RadiologyDataError, match=r"short\.csv: field 'subject_id': expected a row for every image's subject_id "
                                                 r"\(1 missing\), got \[12345678\]"):
        read_mimic_cxr(root, root / "short.csv")
    demo.assign(gender=["F", "unknown-code"]).to_csv(root / "odd.csv", index=False)
    with pytest.raises(RadiologyDataError, match=r"odd\.csv \(subject 12345678\): field 'gender': expected M / F"):
        read_mimic_cxr(root, root / "odd.csv")
    demo.drop(columns="race").to_csv(root / "norace.csv", index=False)
    with pytest.raises(RadiologyDataError, match=r"norace\.csv: field 'race or ethnicity': expected a column"):
        read_mimic_cxr(root, root / "norace.csv")
    split = pd.read_csv(root / "mimic-cxr-2.0.0-split.csv")
    split.assign(split=["train", "train", "dev", "test"]).to_csv(root / "mimic-cxr-2.0.0-split.csv", index=False)
    with pytest.raises(RadiologyDataError, match=r"split\.csv: field 'split': expected train, validate or test, got 'dev'"):
        read_mimic_cxr(root)
    split.to_csv(root / "mimic-cxr-2.0.0-split.csv", index=False)
    (root / "files/p12/p12345678/s55555555/d4.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images listed .* are missing .*d4\.jpg"):
        read_mimic_cxr(root)
    _jpg(root / "files/p12/p12345678/s55555555/d4.jpg")
    pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv")[["subject_id", "study_id"]].to_csv(
        root / "mimic-cxr-2.0.0-chexpert.csv", index=False)
    with pytest.raises(RadiologyDataError, match=r"chexpert\.csv: field 'Cardiomegaly, Pleural Effusion.*expected CheXpert"):
        read_mimic_cxr(root)
    (root / "mimic-cxr-2.0.0-metadata.csv.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"mimic-cxr-2\.0\.0-metadata\.csv: not found"):
        read_mimic_cxr(root)
