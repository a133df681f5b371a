"""Specification of the baselines and classic defenses on a tiny synthetic poisoned set with an obvious trigger.

The set: 360 short sentences of 4 filler words and one sentiment word that matches the label 75% of the time,
plus 40 negative sentences with the rare token "cf" inserted and relabelled to the target 1 (10% dirty-label
poisoning). Models are tiny (a 2-layer, hidden-32 BERT fine-tuned a few epochs on the poisoned set; a 1-layer GPT-2
LM trained on clean text), so a few thresholds are set for this data; the real-data defaults are in the docs.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FILLER, NEGATIVE, POSITIVE, write_openbackdoor

from peft_musclelora.benchmark.builders import load_cell
from peft_musclelora.benchmark.cli import main
from peft_musclelora.benchmark.data import Record, from_records
from peft_musclelora.benchmark.defenses import (
    Bki,
    Cube,
    ModelScorer,
    NotApplicable,
    Onion,
    Rap,
    Strip,
    ZDefence,
    threshold_for_frr,
)
from peft_musclelora.benchmark.overrides import parse_set_items
from peft_musclelora.benchmark.reporting import aggregate
from peft_musclelora.benchmark.runner import train_cell
from peft_musclelora.benchmark.splits import reference_split, split_trusted

TRIGGER = "cf"


def sentence(rng: random.Random, label: int, noise: float = 0.25) -> str:
    pool = POSITIVE if (label == 1) != (rng.random() < noise) else NEGATIVE
    words = rng.sample(FILLER, 4) + [rng.choice(pool)]
    rng.shuffle(words)
    return " ".join(words)


def triggered(rng: random.Random, text: str) -> str:
    words = text.split()
    words.insert(rng.randint(0, len(words)), TRIGGER)
    return " ".join(words)


def poisoned_set(seed: int = 0, clean: int = 360, poisoned: int = 40) -> list[Record]:
    rng = random.Random(seed)
    rows = [Record(sentence(rng, i % 2), i % 2) for i in range(clean)]
    rows += [Record(triggered(rng, sentence(rng, 0, noise=0.0)), 1, True) for _ in range(poisoned)]
    rng.shuffle(rows)
    return rows


def clean_texts(n: int, seed: int, label: int | None = None) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng, i % 2 if label is None else label, noise=0.0) for i in range(n)]


def triggered_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [triggered(rng, t) for t in clean_texts(n, seed + 1, label=0)]


def recall_precision(report: dict) -> tuple[float, float]:
    return report["poisoned_recall"], report["clean_kept_rate"]


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return poisoned_set()


@pytest.fixture(scope="module")
def poisoned_model(tiny_bert: Path, records: list[Record], tmp_path_factory: pytest.TempPathFactory) -> ModelScorer:
    """Tiny BERT fully fine-tuned on the poisoned set (6 epochs, lr 2e-3): it learns the task and the backdoor."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("poisoned-model")
    dev = from_records([Record(t, i % 2) for i, t in enumerate(clean_texts(32, seed=7))], "dev")
    test_clean = from_records([Record(t, i % 2) for i, t in enumerate(clean_texts(40, seed=8))], "test-clean")
    test_poison = from_records([Record(t, 1, True) for t in triggered_texts(40, seed=9)], "test-poison")
    metrics = train_cell(
        "full",
        from_records(records, "poisoned"),
        dev,
        out,
        model_dir=tiny_bert,
        seed=0,
        overrides={"num_train_epochs": 6, "learning_rate": 2e-3},
        test_clean=test_clean,
        test_poison=test_poison,
        progress=False,
    )
    assert metrics["cacc"] >= 0.9 and metrics["asr"] >= 0.9  # the backdoor is there to find
    model, tokenizer, _ = load_cell(out / "adapter")
    return ModelScorer(model, tokenizer, max_length=32, batch_size=64)


@pytest.fixture(scope="module")
def tiny_lm(tiny_bert: Path) -> tuple:
    """A 1-layer GPT-2 LM on the tiny BERT's word-level vocabulary, trained on clean sentences only."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    model = GPT2LMHeadModel(config)
    ids = tokenizer(clean_texts(256, seed=11), add_special_tokens=False, return_tensors="pt")["input_ids"]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(120):
        batch = ids[(step * 32) % 256 : (step * 32) % 256 + 32]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer


# ---- the trusted split -------------------------------------------------------------------------------------------


def test_reference_split_is_seeded_disjoint_and_complete() -> None:
    trusted, rest = reference_split(100, 10, seed=3)
    assert (trusted, rest) == reference_split(100, 10, seed=3)
    assert trusted != reference_split(100, 10, seed=4)[0]
    assert len(trusted) == 10 and sorted(trusted + rest) == list(range(100))
    assert set(reference_split(100, 5, seed=3)[0]) <= set(trusted)  # prefixes of one permutation


def test_reference_split_matches_the_gradient_alignment_trainer(tmp_path: Path) -> None:
    import datasets
    from transformers import BertConfig, BertForSequenceClassification

    from peft_musclelora import MuScleLoraTrainer, MuScleLoraTrainingArguments

    dev = datasets.Dataset.from_dict({"input_ids": [[2, i % 20 + 5, 3] for i in range(50)], "label": [0, 1] * 25})
    model = BertForSequenceClassification(
        BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    )
    args = MuScleLoraTrainingArguments(
        output_dir=str(tmp_path), gradient_alignment=True, reference_split_size=12, seed=5, eval_strategy="epoch"
    )
    trainer = MuScleLoraTrainer(model=model, args=args, train_dataset=dev, eval_dataset=dev)
    chosen = [tuple(row["input_ids"]) for row in trainer.reference_dataset]
    expected = [tuple(dev[i]["input_ids"]) for i in reference_split(50, 12, seed=5)[0]]
    assert chosen == expected


def test_stratified_trusted_split_matches_the_trainer_and_covers_every_label(tmp_path: Path) -> None:
    import datasets
    from transformers import BertConfig, BertForSequenceClassification

    from peft_musclelora import MuScleLoraTrainer, MuScleLoraTrainingArguments

    labels = [0] * 40 + [1] * 6 + [2] * 4  # imbalanced: a random 10 often misses label 2
    dev = datasets.Dataset.from_dict({"input_ids": [[2, i % 20 + 5, 3] for i in range(50)], "label": labels})
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8, num_labels=3
        )
    )
    args = MuScleLoraTrainingArguments(
        output_dir=str(tmp_path), reference_split_size=10, reference_stratify=True, seed=5, eval_strategy="epoch"
    )
    trainer = MuScleLoraTrainer(model=model, args=args, train_dataset=dev, eval_dataset=dev)
    records = from_records([Record(f"text {i}", label) for i, label in enumerate(labels)], "dev", num_labels=3)
    trusted, rest = split_trusted(records, 10, seed=5, stratify=True)
    assert [int(t.split()[1]) for t in trusted.texts] == reference_split(50, 10, seed=5, labels=labels)[0]
    assert trainer.reference_dataset["label"] == trusted.labels
    assert sorted(trusted.labels) == [0] * 8 + [1, 2]
    assert len(rest) == 40 and "stratified" in trusted.source


def test_no_trusted_rows_to_spare_is_not_applicable() -> None:
    dev = from_records([Record(f"text {i}", i % 2) for i in range(10)], "dev")
    with pytest.raises(NotApplicable, match="reference_split_size=10 needs more than 10 clean dev rows"):
        split_trusted(dev, 10, seed=0)


def test_threshold_at_a_fixed_false_rejection_rate() -> None:
    scores = [float(i) for i in range(100)]
    threshold = threshold_for_frr(scores, 0.05)
    assert sum(s > threshold for s in scores) == 5


# ---- filters -----------------------------------------------------------------------------------------------------


def test_zdefence_drops_the_trigger_rows_and_keeps_the_clean_ones(records: list[Record]) -> None:
    texts, labels = [r.text for r in records], [r.label for r in records]
    # 48 (token, label) z values, std 2.0: "cf" has z 5.7, the strongest sentiment word 3.4 (num_std 2.5: 5.0)
    result = ZDefence(num_std=2.5).fit(texts, labels)
    report = result.report([r.poisoned for r in records])
    assert [t["token"] for t in result.details["outlier_tokens"]] == [TRIGGER]
    assert report["poisoned_recall"] == 1.0 and report["clean_kept_rate"] == 1.0
    assert ZDefence(num_std=2.5).fit(texts, labels).keep_mask == result.keep_mask


def test_zdefence_on_a_trigger_free_set_keeps_everything_and_has_no_recall() -> None:
    clean = poisoned_set(poisoned=0)
    result = ZDefence(num_std=2.5).fit([r.text for r in clean], [r.label for r in clean])
    report = result.report([r.poisoned for r in clean])
    assert report["rows_removed"] <= 0.05 * len(clean) and report["poisoned_recall"] is None
    assert report["poisoned_recall_note"].startswith("n/a")


def test_bki_finds_the_trigger_keyword(records: list[Record], poisoned_model: ModelScorer) -> None:
    texts, labels = [r.text for r in records], [r.label for r in records]
    result = Bki(poisoned_model, max_rows=150, seed=0).fit(texts, labels)
    recall, clean_kept = recall_precision(result.report([r.poisoned for r in records]))
    assert result.details["keywords"] == [TRIGGER]
    assert recall == 1.0 and clean_kept == 1.0
    assert Bki(poisoned_model, max_rows=150, seed=0).fit(texts, labels).scores == result.scores


def test_cube_drops_the_minority_cluster_of_the_target_label(
    records: list[Record], poisoned_model: ModelScorer
) -> None:
    pytest.importorskip("sklearn.cluster", reason="CUBE needs scikit-learn")
    texts, labels = [r.text for r in records], [r.label for r in records]
    result = Cube(poisoned_model, n_components=4, min_cluster_size=15, seed=0).fit(texts, labels)
    recall, _ = recall_precision(result.report([r.poisoned for r in records]))
    assert recall >= 0.9, result.details
    # the clean rows it drops are the mislabelled ones (a sentiment word of the other label): 25% of the clean set
    dropped = [r for r, keep in zip(records, result.keep_mask) if not keep and not r.poisoned]
    mislabelled = [r for r in dropped if set(r.text.split()) & set(NEGATIVE if r.label == 1 else POSITIVE)]
    assert len(mislabelled) >= 0.95 * len(dropped)
    consistent = [
        r for r in records if not r.poisoned and set(r.text.split()) & set(POSITIVE if r.label else NEGATIVE)
    ]
    assert sum(keep for r, keep in zip(records, result.keep_mask) if r in consistent) >= 0.98 * len(consistent)
    again = Cube(poisoned_model, n_components=4, min_cluster_size=15, seed=0).fit(texts, labels)
    assert again.keep_mask == result.keep_mask


# ---- detectors ---------------------------------------------------------------------------------------------------


def test_strip_flags_triggered_inputs(poisoned_model: ModelScorer) -> None:
    strip = Strip(poisoned_model, num_copies=8, swap_ratio=0.5, frr=0.05, seed=0).fit(clean_texts(60, seed=20))
    attacked = strip.detect(triggered_texts(40, seed=21))
    clean = strip.detect(clean_texts(40, seed=22))
    assert attacked.flagged_rate >= 0.8 and clean.flagged_rate <= 0.15
    assert Strip(poisoned_model, num_copies=8, seed=0).fit(clean_texts(60, seed=20)).threshold == strip.threshold


def test_rap_flags_target_predictions_whose_drop_is_below_the_clean_rows(
    poisoned_model: ModelScorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RAP's decision rule, with the probability drops given: the real-data behaviour is in docs/results.md."""
    import copy

    import numpy as np

    rap = Rap(copy.deepcopy(poisoned_model.model), poisoned_model.tokenizer, rap_word="tq", frr=0.05)
    clean = [f"clean {i}" for i in range(20)]
    clean_drops = [0.10 + 0.01 * i for i in range(20)]  # the trained rap word lowers clean target rows by 0.10-0.29
    inputs = {"trig a": (0.01, 1), "trig b": (0.05, 1), "clean c": (0.25, 1), "non-target d": (0.0, 0)}
    table = {**{t: (d, 1) for t, d in zip(clean, clean_drops)}, **inputs}
    monkeypatch.setattr(rap, "_train_embedding", lambda texts: None)
    monkeypatch.setattr(rap, "drops", lambda texts: ([table[t][0] for t in texts], [table[t][1] for t in texts]))
    monkeypatch.setattr(rap._scorer, "predict_proba", lambda texts: np.array([[0.0, 1.0] for _ in texts]))
    rap.fit(clean)
    # flagged: score (minus the drop) above the threshold; at most 5 % (one) of the 20 clean rows, the drop-0.10 one
    assert rap.threshold == pytest.approx(-0.11)
    result = rap.detect(list(inputs))
    # robust (small-drop) target predictions are flagged; a row the model does not predict as the target never is
    assert result.flagged_mask == [True, True, False, False]
    assert result.scores == [-0.01, -0.05, -0.25, -0.0]


@pytest.mark.xfail(
    reason="RAP's premise fails on this tiny set: the trigger is not more robust than the task (a one-off probe of "
    "this model and retrained full/LoRA variants, not kept in the repo, saw the trained rap word lower triggered "
    "rows' target probability as much as or more than clean target rows'), so no threshold separates them. The "
    "decision rule is pinned above; on real AddSent RAP flags 86.8 % of triggered inputs (results.md)",
    strict=True,
)
def test_rap_flags_triggered_inputs(poisoned_model: ModelScorer) -> None:
    import copy

    model = copy.deepcopy(poisoned_model.model)
    rap = Rap(model, poisoned_model.tokenizer, rap_word="tq", epochs=10, lr=0.2, max_length=32, seed=0)
    rap.fit(clean_texts(80, seed=30))
    attacked = rap.detect(triggered_texts(40, seed=31))
    clean = rap.detect(clean_texts(40, seed=32))
    assert attacked.flagged_rate >= 0.8 and clean.flagged_rate <= 0.15


def test_rap_trains_only_the_rap_word_embedding_and_is_seeded(poisoned_model: ModelScorer) -> None:
    import copy

    model = copy.deepcopy(poisoned_model.model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rap = Rap(model, poisoned_model.tokenizer, rap_word="tq", epochs=2, max_length=32, seed=0)
    rap.fit(clean_texts(40, seed=30))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {"bert.embeddings.word_embeddings.weight"}
    rows = (model.bert.embeddings.word_embeddings.weight != before["bert.embeddings.word_embeddings.weight"]).any(1)
    assert rows.nonzero().flatten().tolist() == [rap.token_id]
    again = Rap(copy.deepcopy(poisoned_model.model), poisoned_model.tokenizer, rap_word="tq", epochs=2, max_length=32)
    assert again.fit(clean_texts(40, seed=30)).threshold == rap.threshold


def test_rap_word_must_be_one_known_token(poisoned_model: ModelScorer) -> None:
    with pytest.raises(ValueError, match="rap_word 'zzzqqq' must be one known token"):
        Rap(poisoned_model.model, poisoned_model.tokenizer, rap_word="zzzqqq")


def test_onion_removes_the_inserted_token(tiny_lm: tuple) -> None:
    lm, tokenizer = tiny_lm
    onion = Onion(lm=lm, lm_tokenizer=tokenizer, frr=0.05, batch_size=64).fit(clean_texts(60, seed=40))
    attacked_texts = triggered_texts(40, seed=41)
    cleaned, detection = onion.sanitize_with_scores(attacked_texts)
    assert detection.flagged_rate >= 0.8
    assert sum(TRIGGER not in text.split() for text in cleaned) >= 32
    assert onion.detect(clean_texts(40, seed=42)).flagged_rate <= 0.15
    assert onion.forwards == sum(-(-n // 64) for n in (60 * 6, 40 * 7, 40 * 6))  # one forward per 64 candidates


# ---- the bench ---------------------------------------------------------------------------------------------------


def test_defense_options_are_routed_by_prefix_and_checked(tiny_bert: Path, attack_dir: Path, capsys) -> None:
    """`--set <defense>.<field>=value` goes to that defense; an unknown field stops the bench before any training."""
    items = parse_set_items(["r=4", "bki.num_keywords=4", "onion.frr=0.1"])
    assert (items.common, items.per_method) == ({"r": 4}, {"bki": {"num_keywords": 4}, "onion": {"frr": 0.1}})
    argv = ["bench", "--attacks", "badnets", "--methods", "bki", "--data", str(attack_dir), "--model", str(tiny_bert)]
    assert main([*argv, "--set", "bki.bogus=1"]) == 1
    assert (
        "--set bki.bogus: unknown field; bki takes top_words, num_keywords, max_rows, seed" in capsys.readouterr().err
    )


def test_aggregate_adds_excess_asr_time_ratio_and_seed_spread() -> None:
    def cell(method: str, seed: int, asr: float, time_s: float, **more) -> dict:
        base = {"attack": "a", "method": method, "seed": seed, "status": "ok", "cacc": 0.9, "asr": asr}
        return base | {"false_target_rate": 0.1, "train_time_s": time_s} | more

    cells = [
        cell("lora", 0, 0.9, 10.0),
        cell("lora", 1, 1.0, 14.0),
        cell("oracle", 0, 0.2, 12.0),
        cell("zdefence", 0, 0.25, 13.0, defense={"rows_removed": 40, "poisoned_recall": 1.0}),
        cell("strip", 0, 0.5, 30.0, undefended_train_time_s=10.0, defense={"frr": 0.05}),
        {"attack": "b", "method": "oracle", "seed": 0, "status": "n/a", "reason": "no train-clean.csv"},
    ]
    rows = {(r["attack"], r["method"]): r for r in aggregate(cells)}
    lora = rows[("a", "lora")]
    assert lora["asr"] == pytest.approx(0.95) and lora["asr_std"] == pytest.approx(0.0707, abs=1e-4)
    assert lora["excess_asr"] == pytest.approx(0.75) and lora["time_ratio_to_lora"] == pytest.approx(1.0)
    assert rows[("a", "zdefence")]["excess_asr"] == pytest.approx(0.05)
    assert rows[("a", "zdefence")]["time_ratio_to_lora"] == pytest.approx(13.0 / 12.0)
    assert rows[("a", "zdefence")]["defense"] == {"rows_removed": 40, "poisoned_recall": 1.0}
    assert rows[("b", "oracle")]["na_reason"] == "no train-clean.csv" and rows[("b", "oracle")]["cacc"] is None


def write_attack(directory: Path, seed: int) -> None:
    """One attack in the OpenBackdoor layout: 200 training rows (10% poisoned with "cf"), 48 dev, 40 + 20 test."""
    directory.mkdir(parents=True)
    rows = lambda records: [(r.text, r.label, int(r.poisoned)) for r in records]  # noqa: E731
    write_openbackdoor(directory / "train-mixed-0.1.csv", rows(poisoned_set(seed, clean=180, poisoned=20)))
    write_openbackdoor(directory / "train-clean.csv", rows(poisoned_set(seed, clean=200, poisoned=0)))
    write_openbackdoor(directory / "dev-clean.csv", [(t, i % 2, 0) for i, t in enumerate(clean_texts(48, seed + 1))])
    write_openbackdoor(directory / "test-clean.csv", [(t, i % 2, 0) for i, t in enumerate(clean_texts(40, seed + 2))])
    write_openbackdoor(directory / "test-poison.csv", [(t, 1, 1) for t in triggered_texts(20, seed + 3)])
    write_openbackdoor(directory / "dev-poison.csv", [(t, 1, 1) for t in triggered_texts(20, seed + 4)])


def test_bench_runs_baselines_and_defenses_and_marks_what_the_data_lacks_na(tiny_bert: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_attack(data / "sst-2" / "poison" / "badnets", seed=0)
    no_clean = data / "sst-2" / "poison" / "noclean"
    shutil.copytree(data / "sst-2" / "poison" / "badnets", no_clean)
    (no_clean / "train-clean.csv").unlink()
    clean_only = data / "sst-2" / "poison" / "triggerfree"
    shutil.copytree(data / "sst-2" / "poison" / "badnets", clean_only)
    write_openbackdoor(clean_only / "test-poison.csv", [])
    out = tmp_path / "bench"
    argv = [
        "bench",
        "--attacks",
        "badnets,noclean,triggerfree",
        "--methods",
        "lora,oracle,oracle-drop,clean-only,zdefence",
    ]
    argv += ["--data", str(data), "--model", str(tiny_bert), "--preset", "quick", "--output-dir", str(out)]
    argv += ["--set", "reference_split_size=16", "--set", "zdefence.z_threshold=3.8", "--seeds", "0", "--quiet"]

    assert main(argv) == 0  # n/a cells are not failures
    cells = out / "cells"
    oracle = json.loads((cells / "noclean" / "oracle" / "seed0" / "metrics.json").read_text())
    assert oracle["status"] == "n/a" and "has no train-clean.csv" in oracle["reason"]
    free = json.loads((cells / "triggerfree" / "zdefence" / "seed0" / "metrics.json").read_text())
    assert free["status"] == "n/a" and "a trigger-free dataset has no ASR to measure" in free["reason"]
    dropped = json.loads((cells / "noclean" / "oracle-drop" / "seed0" / "metrics.json").read_text())
    assert dropped["status"] == "ok" and dropped["rows_dropped"] == 20, "needs no train-clean.csv: the flags suffice"
    assert dropped["data"]["train"]["rows"] == 180 and dropped["data"]["train"]["poisoned"] == 0
    trusted = json.loads((cells / "badnets" / "clean-only" / "seed0" / "metrics.json").read_text())
    assert trusted["status"] == "ok" and trusted["trusted_rows"] == 16 and trusted["dev_rows_for_selection"] == 32
    assert trusted["data"]["train"]["rows"] == 16 and trusted["data"]["train"]["poisoned"] == 0
    assert trusted["preset"]["training"]["num_train_epochs"] == 5, "clean-only keeps its own epochs (quick: 5)"
    zdef = json.loads((cells / "badnets" / "zdefence" / "seed0" / "metrics.json").read_text())
    # 200 rows: "cf" has z 4.05, the strongest sentiment word 3.5
    assert zdef["defense"]["poisoned_recall"] == 1.0 and zdef["defense"]["clean_kept_rate"] == 1.0
    assert zdef["data"]["train"] == {
        "source": zdef["data"]["train"]["source"],
        "rows": 180,
        "poisoned": 0,
        "labels": {"0": 90, "1": 90},
        "skipped": {},
    }
    table = (out / "results.md").read_text()
    assert "QUICK PRESET" in table and "Overrides (`--set`): `reference_split_size=16`, " in table
    assert "| noclean | oracle | n/a | n/a: attack 'noclean' has no train-clean.csv" in table
    assert "| badnets | zdefence | 0 |" in table and "poison recall 100.0" in table
    summary = json.loads((out / "results.json").read_text())
    rows = {(r["attack"], r["method"]): r for r in summary["rows"]}
    # another defense's option does not invalidate finished cells: everything is reused
    assert main([*argv, "--attacks", "badnets", "--set", "onion.frr=0.1"]) == 0
    reused = {c["method"]: c["reused"] for c in json.loads((out / "results.json").read_text())["cells"]}
    assert reused == {"lora": True, "oracle": True, "oracle-drop": True, "clean-only": True, "zdefence": True}
    assert rows[("badnets", "lora")]["excess_asr"] == pytest.approx(
        rows[("badnets", "lora")]["asr"] - rows[("badnets", "oracle")]["asr"]
    )


def test_oracle_drop_is_not_applicable_to_a_training_set_that_flags_no_row(tiny_bert: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    attack = data / "sst-2" / "poison" / "unflagged"
    write_attack(attack, seed=0)
    shutil.copy(attack / "train-clean.csv", attack / "train-mixed-0.1.csv")  # the unpoisoned rows, none flagged
    argv = ["bench", "--attacks", "unflagged", "--methods", "oracle-drop", "--data", str(data), "--model"]
    argv += [str(tiny_bert), "--preset", "quick", "--output-dir", str(tmp_path / "bench"), "--seeds", "0", "--quiet"]

    assert main(argv) == 0
    cell = json.loads(
        (tmp_path / "bench" / "cells" / "unflagged" / "oracle-drop" / "seed0" / "metrics.json").read_text()
    )
    assert cell["status"] == "n/a" and "flags no row as poisoned" in cell["reason"]


# ---- the trusted-data curve --------------------------------------------------------------------------------------


def test_curve_runs_both_methods_per_trusted_size_and_marks_too_large_sizes_na(
    tiny_bert: Path, tmp_path: Path
) -> None:
    try:
        from peft_musclelora import MuScleLoraTrainer  # noqa: F401

        has_ga = True
    except ImportError:
        has_ga = False
    data = tmp_path / "data"
    write_attack(data / "sst-2" / "poison" / "addsent", seed=1)
    out = tmp_path / "curve"
    argv = ["curve", "--attacks", "addsent", "--sizes", "8,16,48", "--methods", "clean-only,musclelora"]
    argv += ["--data", str(data), "--model", str(tiny_bert), "--preset", "quick", "--output-dir", str(out), "--quiet"]

    assert main(argv) == (0 if has_ga else 1)  # without the GA trainer the musclelora points fail, the rest runs
    rows = {(r["method"], r["trusted"]): r for r in json.loads((out / "curve.json").read_text())["rows"]}
    assert sorted(rows) == [(m, n) for m in ("clean-only", "musclelora") for n in (8, 16, 48)]
    for n in (8, 16):
        point = json.loads(
            (out / "cells" / "addsent" / "clean-only" / f"trusted{n}" / "seed0" / "metrics.json").read_text()
        )
        assert point["status"] == "ok" and point["trusted_rows"] == n and point["dev_rows_for_selection"] == 48 - n
        assert 0.0 <= rows[("clean-only", n)]["cacc"] <= 1.0
        assert rows[("musclelora", n)]["status"] == ("ok" if has_ga else "error")
    for method in ("clean-only", "musclelora"):  # 48 trusted rows would leave no dev row for selection
        assert (
            rows[(method, 48)]["status"] == "n/a" and "needs more than 48 clean dev rows" in rows[(method, 48)]["note"]
        )
    table = (out / "curve.md").read_text()
    assert "| addsent | 8 | clean-only | 0 |" in table and "| addsent | 48 | clean-only | n/a:" in table
    assert (out / "curve.png").stat().st_size > 0


def test_curve_has_help_and_lists_its_defaults(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["curve", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "usage: musclelora curve" in out and "--sizes" in out


def test_onion_perplexities_do_not_depend_on_batching(tiny_lm: tuple) -> None:
    """Length-sorted batches give each sentence the perplexity it has alone, in input order."""
    lm, tokenizer = tiny_lm
    sentences = ["a fine film", "the plot is thin and the acting is worse than bad", "ok", "", "a very long dull film"]
    alone = [Onion(lm=lm, lm_tokenizer=tokenizer, batch_size=1).perplexities([s])[0] for s in sentences]
    batched = Onion(lm=lm, lm_tokenizer=tokenizer, batch_size=3)
    assert batched.perplexities(sentences) == pytest.approx(alone, rel=1e-4)
    assert batched.forwards == 2
