"""The YAML through the CLI (fit, test, predict) on the tiny LM, the chat on its checkpoint in a
pseudo-terminal and through a pipe, and the notebook on the run."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from suite.chat import ChatSession, load_chat_model
from suite.cli import main
from tests.notebooks import assert_fresh, cell_outputs, figure_count, run_notebook

ROOT = Path(__file__).resolve().parents[3]
BASE = str(ROOT / "domains" / "dialogue.yaml")
TINY = ["--model.init_args.backbone", "tiny", "--model.init_args.num_layers", "2", "--data.init_args.languages", "[en, hi]",
        "--data.init_args.n_dialogues", "24", "--data.init_args.batch_size", "4", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--model.init_args.eval_cases", "4", "--model.init_args.test_cases", "6", "--model.init_args.selfplay_cases", "2",
        "--model.init_args.predict_cases", "2", "--model.init_args.max_doctor_turns", "3", "--model.init_args.budget_factor", "0.2"]
CHAT = ["--max-new-tokens", "6", "--sample", "--seed", "1", "--precision", "32", "--context", "age=61; allergies=penicillin"]
SAMPLING = dict(max_new_tokens=6, do_sample=True, seed=1, temperature=0.7, top_p=0.9)


def _read_until(fd: int, wanted: str, out: list[str], timeout: float = 180.0) -> str:
    """Read a pseudo-terminal until ``wanted`` has appeared (its \\r\\n read as \\n)."""
    deadline = time.time() + timeout
    while wanted not in "".join(out).replace("\r\n", "\n"):
        if time.time() > deadline:
            raise AssertionError(f"no {wanted!r} within {timeout} s; read {''.join(out)[-400:]!r}")
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                out.append(os.read(fd, 4096).decode("utf-8", errors="replace"))
            except OSError:  # the child closed the terminal
                break
    return "".join(out).replace("\r\n", "\n")


@pytest.mark.slow
def test_fit_test_predict_chat_and_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("SUITE_DATA_DIR", os.environ["SUITE_DATA_DIR"])  # the children use the session's data cache
    run = tmp_path / "dialogue"
    args = ["--config", BASE, *TINY, "--trainer.default_root_dir", str(run)]
    fit = main(["fit", *args])
    assert fit.model.lm_source.startswith("tiny random Llama") and "val/diagnosis_acc" in fit.trainer.callback_metrics
    ckpt = run / "checkpoints" / "last.ckpt"
    test = main(["test", *args, "--ckpt_path", str(ckpt)])
    m = test.trainer.callback_metrics
    for key in ("test/loss", "test/ppl/en", "test/ppl/hi", "test/diagnosis_acc", "test/urgent_recall", "test/chrf/en",
                "test/bleu/hi", "test/selfplay/diagnosis_acc"):
        assert key in m and torch.isfinite(m[key]), key
    main(["predict", *args, "--ckpt_path", str(ckpt)])
    md = next(run.glob("logs/version_*/predictions/transcripts.md")).read_text()
    assert md.count("\n### ") == 2 and md.count("Symptoms the patient had and did not volunteer") == 2
    assert len(next(run.glob("logs/version_*/predictions/transcripts.jsonl")).read_text().splitlines()) == 2

    # the chat: what it should answer, computed in this process from the checkpoint alone
    model = load_chat_model(ckpt)
    session = ChatSession(model, context="age=61; allergies=penicillin", **SAMPLING)
    assert "Allergies: penicillin" in session.messages[0]["content"]
    first = session.reply("I have had a cough for a week.", lambda s: None)
    second = session.reply("And a fever since yesterday.", lambda s: None)
    assert first.strip() and second.strip()

    cmd = [sys.executable, "-m", "suite.chat", "--ckpt", str(ckpt), *CHAT]
    pid, fd = pty.fork()
    if pid == 0:  # the child: a chat on a terminal
        os.chdir(ROOT)
        os.execvpe(sys.executable, cmd, os.environ)
    out: list[str] = []
    try:
        _read_until(fd, "> ", out)
        os.write(fd, b"I have had a cough for a week.\n")
        _read_until(fd, f"{first}\n> ", out)
        os.write(fd, b"And a fever since yesterday.\n")
        text = _read_until(fd, f"{second}\n> ", out)
        os.write(fd, b"/lang hi\n")
        text = _read_until(fd, "(language: hi)\n> ", out)
        os.write(fd, b"/quit\n")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    # each reply follows its own turn (the two replies of the random tiny LM may read the same)
    asked = text.index("I have had a cough for a week.")
    answered = text.index(first, asked)
    followed = text.index("And a fever since yesterday.", answered + len(first))
    assert text.index(second, followed) > followed

    # a pipe answers one turn: the adapter folder written at the end of fit holds the same model
    card = json.loads((run / "adapter" / "model.json").read_text())
    assert card["class_path"] == "domains.dialogue.model.MedAidLM" and card["init_args"]["backbone"] == "tiny"
    piped = subprocess.run([sys.executable, "-m", "suite.chat", "--ckpt", str(run / "adapter"), *CHAT], cwd=ROOT,
                           input="I have had a cough for a week.\n", capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert piped.stdout == first + "\n"
    bad = subprocess.run([sys.executable, "-m", "suite.chat", "--ckpt", str(tmp_path / "nowhere")], cwd=ROOT, input="hi",
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "neither a checkpoint file nor an adapter folder" in bad.stderr

    nb = run_notebook("dialogue.ipynb", env={"DIALOGUE_RUN": str(run)})
    outputs = cell_outputs(nb)
    assert "test/diagnosis_acc" in outputs and "transcripts; the first" in outputs
    assert figure_count(nb) >= 2  # losses and diagnosis accuracy at least
    assert_fresh("dialogue.ipynb", nb)  # the committed outputs: no error, as many figures as the code draws


@pytest.mark.slow
def test_a_run_resumed_mid_epoch_ends_with_the_uninterrupted_weights(tmp_path):
    """4 steps straight, and 2 + 2 resumed from the step-2 checkpoint inside the first epoch: the
    same adapter weights (the training loader skips the batches it had handed out; pre-context
    dropout is drawn from (seed, epoch, item))."""
    from suite.module import read_checkpoint

    run = ["fit", "--config", BASE, "--config", str(ROOT / "domains" / "dialogue" / "tiny.yaml"), "--data.init_args.precontext_dropout", "0.5",
           "--trainer.precision", "32-true", "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "2",
           "--checkpoint.save_top_k", "-1", "--checkpoint.save_last", "false", "--trainer.logger", "false"]
    main([*run, "--trainer.default_root_dir", str(tmp_path / "straight")])
    step = lambda root, n: next((root / "checkpoints").glob(f"*step={n}*.ckpt"))  # noqa: E731
    main([*run, "--trainer.default_root_dir", str(tmp_path / "resumed"), "--ckpt_path", str(step(tmp_path / "straight", 2))])
    end, resumed, mid = (read_checkpoint(p)["state_dict"] for p in
                         (step(tmp_path / "straight", 4), step(tmp_path / "resumed", 4), step(tmp_path / "straight", 2)))
    assert end.keys() == resumed.keys() and any("lora" in k for k in end)
    for k, v in end.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=0, msg=f"{k} differs after the resume")
    assert any(not torch.equal(v, mid[k]) for k, v in end.items() if v.is_floating_point())  # steps 3-4 trained
