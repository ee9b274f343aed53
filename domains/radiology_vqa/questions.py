"""Templated questions, answers and reports for chest radiographs, from finding labels.

Closed questions are yes/no about one finding or the projection; open questions ask what is
abnormal, the projection, and (where the location is known) the side or zone of a finding, as in
VQA-RAD's chest questions (Lau et al. 2018: presence, position, plane, abnormality). The same
templates serve the generator and real MIMIC-CXR-JPG labels (where a finding can be unknown:
no question is asked about it). Reports follow the MIMIC-CXR free-text layout (FINAL REPORT /
EXAMINATION / FINDINGS / IMPRESSION) so the same section parser reads both.
"""

from __future__ import annotations

import math
import re

import numpy as np

FINDINGS = ("cardiomegaly", "effusion", "opacity", "pneumothorax")

CLOSED = {
    "cardiomegaly": ("Is there cardiomegaly?", "Is the heart enlarged?", "Is the cardiac silhouette enlarged?"),
    "effusion": ("Is there a pleural effusion?", "Is there fluid in the pleural space?", "Is a pleural effusion present?"),
    "opacity": ("Is there a lung opacity?", "Is there an airspace opacity?", "Is there consolidation in the lungs?"),
    "pneumothorax": ("Is there a pneumothorax?", "Is there air in the pleural space?", "Is a pneumothorax present?"),
}
OPEN = {
    "abnormality": ("What abnormality is seen?", "What are the findings?", "What is abnormal in this chest radiograph?"),
    "view": ("What view is this radiograph?", "Which projection is this chest film?"),
    "effusion_side": ("Which side is the pleural effusion on?", "Where is the pleural effusion?"),
    "pneumothorax_side": ("Which side is the pneumothorax on?", "Where is the pneumothorax?"),
    "opacity_location": ("Where is the lung opacity?", "In which zone is the opacity?"),
}
NAMES = {"cardiomegaly": "cardiomegaly", "effusion": "pleural effusion", "opacity": "lung opacity",
         "pneumothorax": "pneumothorax"}
NO_FINDING = "no acute abnormality"


def known(v: float | None) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def abnormality_answer(findings: dict[str, float], where: dict[str, str] | None = None) -> str:
    """Comma-separated present findings with their side where known, or ``no acute abnormality``."""
    where = where or {}
    parts = []
    for f in FINDINGS:
        if known(findings.get(f)) and findings[f] > 0.5:
            loc = where.get(f)
            if not loc:
                parts.append(NAMES[f])
            else:
                parts.append(f"{NAMES[f]} in the {loc} zone" if f == "opacity" else f"{loc} {NAMES[f]}")
    return ", ".join(parts) if parts else NO_FINDING


def questions_for_study(rng: np.random.Generator, findings: dict[str, float], view: str | None,
                        where: dict[str, str] | None = None) -> list[dict[str, str]]:
    """All templated QA pairs of one image: a closed question per known finding, the projection, and
    open questions. Each is ``{question, answer, answer_type (CLOSED/OPEN), question_type}``."""
    where = where or {}
    qa: list[dict[str, str]] = []
    for f in FINDINGS:
        if known(findings.get(f)):
            qa.append({"question": str(rng.choice(CLOSED[f])), "answer": "yes" if findings[f] > 0.5 else "no",
                       "answer_type": "CLOSED", "question_type": f})
    if all(known(findings.get(f)) for f in FINDINGS):  # "what is abnormal" needs every finding known
        qa.append({"question": str(rng.choice(OPEN["abnormality"])), "answer": abnormality_answer(findings, where),
                   "answer_type": "OPEN", "question_type": "abnormality"})
    if view in ("AP", "PA"):
        if rng.random() < 0.5:
            asked = str(rng.choice(["PA", "AP"]))
            article = "an" if asked == "AP" else "a"
            qa.append({"question": f"Is this {article} {asked} radiograph?", "answer": "yes" if asked == view else "no",
                       "answer_type": "CLOSED", "question_type": "view"})
        else:
            qa.append({"question": str(rng.choice(OPEN["view"])), "answer": view, "answer_type": "OPEN", "question_type": "view"})
    for f, key in (("effusion", "effusion_side"), ("pneumothorax", "pneumothorax_side"), ("opacity", "opacity_location")):
        if known(findings.get(f)) and findings[f] > 0.5 and where.get(f):
            answer = "both sides" if where[f] == "both" else where[f]
            qa.append({"question": str(rng.choice(OPEN[key])), "answer": answer, "answer_type": "OPEN", "question_type": key})
    return qa


def report_text(rng: np.random.Generator, findings: dict[str, float], view: str | None,
                where: dict[str, str] | None = None, ctr: float | None = None) -> str:
    """A short MIMIC-CXR-style report stating each known finding (present or absent)."""
    where = where or {}
    pos = lambda f: known(findings.get(f)) and findings[f] > 0.5  # noqa: E731
    neg = lambda f: known(findings.get(f)) and findings[f] <= 0.5  # noqa: E731
    exam = {"PA": "CHEST (PA AND LAT)", "AP": "CHEST (PORTABLE AP)"}.get(view or "", "CHEST RADIOGRAPH")
    lines = []
    if view in ("AP", "PA"):
        lines.append({"PA": "PA and lateral views of the chest.", "AP": "Portable AP view of the chest."}[view])
    if pos("cardiomegaly"):
        size = f" (cardiothoracic ratio about {ctr:.2f})" if ctr else ""
        enlarged = ["The heart is enlarged", "Moderate cardiomegaly", "The cardiac silhouette is enlarged"]
        lines.append(str(rng.choice(enlarged)) + size + ".")
    elif neg("cardiomegaly"):
        lines.append(str(rng.choice(["Heart size is normal.", "The cardiac silhouette is within normal limits."])))
    if pos("effusion"):
        side = {"both": "Bilateral", "right": "Right", "left": "Left"}.get(where.get("effusion", ""), "A")
        lines.append(f"{side} pleural effusion" + str(rng.choice([" with blunting of the costophrenic angle.", "."])))
    elif neg("effusion"):
        lines.append("No pleural effusion.")
    if pos("opacity"):
        loc = f" in the {where['opacity']} zone" if where.get("opacity") else ""
        lines.append(str(rng.choice(["Patchy airspace opacity", "Focal consolidation", "Hazy opacity"])) + loc + ".")
    elif neg("opacity"):
        lines.append(str(rng.choice(["The lungs are clear.", "No focal consolidation."])))
    if pos("pneumothorax"):
        side = where.get("pneumothorax", "")
        lines.append((f"{side.capitalize()} apical" if side else "Apical") + " pneumothorax with a visible pleural line.")
    elif neg("pneumothorax"):
        lines.append("No pneumothorax.")
    impression = abnormality_answer(findings, where)
    impression = impression[0].upper() + impression[1:] + "."
    return (f"                                 FINAL REPORT\n EXAMINATION:  {exam}\n\n FINDINGS:\n\n "
            + "\n ".join(lines) + f"\n\n IMPRESSION:\n\n {impression}\n")


def report_sections(text: str) -> str:
    """FINDINGS and IMPRESSION of a MIMIC-CXR report as one line (the whole text when neither is present)."""
    parts = []
    for name in ("FINDINGS", "IMPRESSION"):
        m = re.search(rf"{name}:\s*(.*?)(?=\n\s*[A-Z][A-Z /]+:|\Z)", text, flags=re.S)
        if m and m.group(1).strip():
            parts.append(" ".join(m.group(1).split()))
    return " ".join(parts) if parts else " ".join(text.split())
