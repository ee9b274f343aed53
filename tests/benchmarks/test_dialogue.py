"""benchmarks/dialogue.py's closing rates, read from a run's generated final turns."""

from __future__ import annotations

import json

import pytest

from benchmarks import dialogue as bench


def test_closing_rates_count_every_closing_turn_by_mode(tmp_path):
    gen = tmp_path / "logs" / "version_0" / "generations"
    gen.mkdir(parents=True)
    turns = [  # (mode, generated final turn, closes?)
        ("given", "From what you describe, this is most likely conjunctivitis. Clean your eyelids.", True),
        ("given", "From what you describe, this is most likely asthma. Rest.", True),  # a disease the knowledge base lacks
        ("given", "Do you have any chronic health conditions?", False),  # holds the diagnosis cue "you have", yet asks
        ("given", "One important question: do you have bluish lips?", False),
        ("blind", "Your symptoms suggest mastitis. Keep breastfeeding.", True),
        ("blind", "Are you allergic to any medicines?", False),
        ("none", "मरीज़ की जानकारी नहीं है। आपके लक्षण माइग्रेन की ओर इशारा करते हैं।", True),  # Hindi diagnosis opening
    ]
    rows = [{"pre_context_mode": m, "language": "hi" if m == "none" else "en", "final": t} for m, t, _ in turns]
    (gen / "test-epoch0.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = bench.closed_by_mode(tmp_path)
    assert out == {"closed/mode=given": pytest.approx(2 / 4), "closed/mode=blind": pytest.approx(1 / 2), "closed/mode=none": 1.0}
    assert bench.closed_by_mode(tmp_path / "absent") == {}
