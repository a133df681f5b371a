"""The named, documented method presets: `full`, `lora`, `mslr`, `musclelora`, `ga-lora`, `ga-lora-tuned` (this
project's gradient-alignment recipe), the row filters `fit-gap`, `fit-gap-unlearn`, `fit-gap-poe`,
`fit-gap-teacher`, `fit-gap-gated`, `fit-gap-gated-refit`, `fit-gap-evidence`, `fit-gap-inserted` and
`fit-gap-either`, `recommended` (currently `fit-gap-either`), and the decoder-LLM presets `lora-llama` /
`musclelora-llama` (the reference's Llama-2 hyper-parameters).

A preset is a [`MethodPreset`] (see [`peft_musclelora.benchmark.settings`]). The reference recipe freezes the
classification layer at its random initialisation when LoRA is used; `mslr`, `musclelora` and `ga-lora` do that
(`freeze_head=True`). `lora` trains the classifier (peft's `modules_to_save`), the usual LoRA setup;
`--set freeze_head=true` gives the reference's frozen-head LoRA.

Example:
    >>> get_preset("musclelora").training.ga.reference_split_size
    96
    >>> get_preset("lora", {"r": 4}).adapter.r, PRESETS["lora"].adapter.r
    (4, 8)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

from peft_musclelora.gradient_alignment import GradientAlignmentArguments
from peft_musclelora.row_filter import RowFilterArguments

from .settings import PUBLISHED_GA, AdapterSettings, MethodPreset, TrainingSettings, apply_overrides

_COMMON = "Checkpoint by clean-dev accuracy."


#: Gradient alignment with its gates open: the aligned update on every step (warm-up 0, no raw mixing, no loss floor).
def _ga(**changes: Any) -> GradientAlignmentArguments:
    """The published gates (`PUBLISHED_GA`) with `changes`."""
    return dataclasses.replace(PUBLISHED_GA, **changes)


_GA_EVERY_STEP: dict[str, Any] = {
    "gradient_alignment": True,
    "ga_warmup_epochs": 0.0,
    "max_raw_grad_ratio": 0.0,
    "min_ref_loss": 0.0,
}
_LLAMA_TRAINING = TrainingSettings(
    learning_rate=1e-5,
    num_train_epochs=5.0,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=32,
    max_length=128,
)

_FIT_GAP_TEXT = (
    "Plain LoRA r 8 / alpha 32 with a trainable classifier, lr 1e-3 (the rate at which LoRA reached the oracle's "
    "clean accuracy at full size), trained on the rows fit-gap filtering keeps: two fold "
    "probes (lr 1e-3) score every training row at steps 16, 32, 64 against 400 trusted clean-dev rows (removed from "
    "dev); a row fitted better (shortcut) or worse (contradicted label) than the trusted rows allow is dropped, "
    "with cut-offs that flag at most 4% of the trusted rows. Per-row decisions in the cell's row_filter.json. "
    "Experimental: at full size it finds too few poisoned rows to defend (docs/row_filter.md). "
)
_FIT_GAP = MethodPreset(
    name="fit-gap",
    description=_FIT_GAP_TEXT + _COMMON,
    adapter=AdapterSettings(kind="lora"),
    training=TrainingSettings(
        learning_rate=1e-3,
        ga=_ga(reference_split_size=400),
        row_filter=RowFilterArguments(row_filter=True, row_filter_probe_learning_rate=1e-3),
    ),
)


def _row_filter_training(base: MethodPreset, **changes: Any) -> TrainingSettings:
    """`base`'s training settings with `changes` to its row-filter arguments."""
    return dataclasses.replace(base.training, row_filter=dataclasses.replace(base.training.row_filter, **changes))


_FIT_GAP_UNLEARN = MethodPreset(
    name="fit-gap-unlearn",
    description="fit-gap, then unlearning of the rows it isolated as fitted early (row_filter_unlearn): 100 AdamW "
    "steps (lr 1e-3) that keep fitting the kept rows while pushing the isolated rows' loss up to chance (ln 2), "
    "ending on the last state (checked every 10 steps) whose accuracy on the 400 trusted rows is at most 1 point "
    "below where it started. Experimental (docs/row_filter.md). " + _COMMON,
    adapter=AdapterSettings(kind="lora"),
    training=_row_filter_training(_FIT_GAP, row_filter_unlearn=True),
)

_FIT_GAP_POE = MethodPreset(
    name="fit-gap-poe",
    description="fit-gap-unlearn with a shallow expert (docs/row_filter.md): an out-of-fold n-gram logistic "
    "regression over the rows' token ids is scored as one more probe step (row_filter_shallow_probe=ngram), and the "
    "kept rows train as a product of experts with it, CE(log_softmax(logits) + 6 * log p_ngram), so rows the n-gram "
    "model explains confidently (a lexical trigger it saw in other rows) give the adapter little gradient; "
    "evaluation and inference use the model alone. For instruction tuning see `musclelora instruct --method "
    "fit-gap-poe`. " + _COMMON,
    adapter=AdapterSettings(kind="lora"),
    training=_row_filter_training(
        _FIT_GAP_UNLEARN,
        row_filter_shallow_probe="ngram",
        row_filter_shallow_expert=True,
        row_filter_shallow_expert_weight=6.0,
    ),
)

_FIT_GAP_TEACHER = MethodPreset(
    name="fit-gap-teacher",
    description="Experimental (docs/results.md, sessions 13-14): fit-gap-poe with the shallow expert at weight 4 and "
    "a trusted teacher (docs/row_filter.md): a model trained on the 400 trusted rows alone (144 steps, its class "
    "balance matched to the training labels') predicts every training row, and each kept row trains on its label "
    "mixed half and half with that prediction (row_filter_teacher_mix=0.5), so a relabelled row pulls the adapter "
    "less far towards its label. Full size, three seeds (docs/results.md, session 14): StyleBkd "
    "85.1 / 19.3 and SynBkd 85.6 / 20.5 (CACC / ASR; the oracle 87.2 / 23.3 and 24.7), AddSent 86.1 / 6.4, BadNets "
    "84.6 / 1.6, and 1.4 under plain LoRA on unpoisoned data, which is why it is not the default. Add "
    "row_filter_refit_bias=true to read its ASR at the oracle's false-target rate. " + _COMMON,
    adapter=AdapterSettings(kind="lora"),
    training=_row_filter_training(_FIT_GAP_POE, row_filter_shallow_expert_weight=4.0, row_filter_teacher_mix=0.5),
)

_FIT_GAP_GATED = MethodPreset(
    name="fit-gap-gated",
    description="fit-gap-teacher with the teacher's share gated by the model being trained "
    "(row_filter_teacher_mix_gate=model_contradicts; docs/row_filter.md): a kept row trains on its label mixed half "
    "and half with the trusted teacher's prediction only at the steps where the model's own most likely class is not "
    "its label, so a clean row the model has learned trains on its label alone whatever the 400-row teacher thinks "
    "of it, and a relabelled row, which the product of experts keeps the model from fitting, keeps the teacher's "
    "pull. Also `musclelora instruct --method fit-gap-gated`, on the answer tokens (docs/llm.md). Full size, three "
    "seeds (docs/results.md, session 17; CACC / ASR, means): BadNets 86.2 / 2.0, AddSent 86.0 / 5.6, StyleBkd 85.9 / "
    "25.4, SynBkd 86.2 / 20.7 (the oracle 87.2; ASR 8.1 / 12.3 / 23.3 / 24.7), 0.0-0.4 under plain LoRA on "
    "unpoisoned data (by seed). " + _COMMON,
    adapter=AdapterSettings(kind="lora"),
    training=_row_filter_training(_FIT_GAP_TEACHER, row_filter_teacher_mix_gate="model_contradicts"),
)

_FIT_GAP_GATED_REFIT = MethodPreset(
    name="fit-gap-gated-refit",
    description="fit-gap-gated with the output bias refitted on the 400 trusted rows after an unlearning phase that "
    "ran (row_filter_unlearn_refit_bias=true; docs/row_filter.md): pushing the isolated rows to chance moves the "
    "class balance by an amount the phase's accuracy guard does not hold (false-target rate anywhere from 6 to 22 % "
    "after it), and the trusted rows give it back. A run whose phase is skipped for want of evidence (the paraphrase "
    "attacks, unpoisoned data) is exactly fit-gap-gated. Full size, five seeds (docs/results.md, session 20; CACC / "
    "ASR, means): BadNets 86.0 / 2.2, AddSent 86.1 / 9.5 (fit-gap-gated: 85.8 / 2.6 and 85.9 / 6.6). " + _COMMON,
    adapter=AdapterSettings(kind="lora"),
    training=_row_filter_training(_FIT_GAP_GATED, row_filter_unlearn_refit_bias=True),
)

_FIT_GAP_EVIDENCE = MethodPreset(
    name="fit-gap-evidence",
    description="fit-gap-gated-refit whose kept rows train on their labels alone when the filter's isolation "
    "evidence is strong (row_filter_plain_significance=1e-4: z above 3.72, where the unlearning phase needs 2.33; "
    "docs/row_filter.md): a filter that isolated that many more rows than the trusted rows' clean rate caught a "
    "shortcut, so the shallow expert and the teacher, which cost clean accuracy to hold back the triggers a filter "
    "misses, are left out, and the unlearning phase removes what the missed rows taught. Elsewhere (weaker evidence, "
    "no evidence) exactly fit-gap-gated-refit. Full size, five seeds (docs/results.md, session 21; CACC / ASR, "
    "means): BadNets 86.7 / 2.5, AddSent 86.9 / 7.0 (fit-gap-gated-refit: 86.0 / 2.2 and 86.1 / 9.5). " + _COMMON,
    adapter=AdapterSettings(kind="lora"),
    training=_row_filter_training(_FIT_GAP_GATED_REFIT, row_filter_plain_significance=1e-4),
)

_FIT_GAP_INSERTED = MethodPreset(
    name="fit-gap-inserted",
    description="fit-gap-evidence whose unlearning phase also inserts the trigger it reads off the isolated rows "
    "into the kept rows and asks that their prediction not move (row_filter_unlearn_target=chance_inserted; "
    "docs/row_filter.md): pushing an isolated row whose content agrees with its label to chance teaches its trigger "
    "as evidence against that label, and the inserted copies, rows of every class, hold the trigger to what it does "
    "to them before the phase. Where the phase is skipped, or finds no trigger token, fit-gap-evidence. The guard "
    "keeps the last state whose trusted accuracy is within its bound and whose trusted rows' label loss has not "
    "risen (row_filter_unlearn_guard=accuracy_and_loss, a one-sided paired test at 1 %): a state that matches the "
    "start's accuracy while its trusted rows' labels grew less likely is not kept. The phase's "
    "and the trusted teacher's batches run in length-sorted chunks of 8 rows (row_filter_unlearn_chunk_rows, "
    "row_filter_teacher_chunk_rows: the same losses with less padding, 1.91-2.06x undefended LoRA's time where 2.21x "
    "in whole batches, on a CPU; on an accelerator set both to none). " + _COMMON,
    adapter=AdapterSettings(kind="lora"),
    training=_row_filter_training(
        _FIT_GAP_EVIDENCE,
        row_filter_unlearn_target="chance_inserted",
        row_filter_unlearn_guard="accuracy_and_loss",
        row_filter_unlearn_chunk_rows=8,
        row_filter_teacher_chunk_rows=8,
    ),
)

_FIT_GAP_EITHER = MethodPreset(
    name="fit-gap-either",
    description="fit-gap-inserted whose unlearning phase runs only where the kept rows trained plainly "
    "(row_filter_unlearn_significance=1e-4, the plain level), so a run gets one remedy for the rows its filter "
    "missed, never both: on strong isolation evidence plain training then the phase (and the bias refit), elsewhere "
    "the shallow expert and the gated teacher and no phase. On the six full-size cells whose evidence fell between "
    "the two levels (SynBkd seed 1; BadNets at 4 and 5 %, AddSent at 4 %, with triggers the project had not used, "
    "seeds 0-1; docs/results.md, sessions 35-36), the phase on top of the expert and the teacher raised the ASR by "
    "5.2-10.2 points (7.0 on average) and moved clean accuracy by -0.93 to +1.05 (-0.18 on average). Elsewhere "
    "exactly fit-gap-inserted. " + _COMMON,
    adapter=AdapterSettings(kind="lora"),
    training=_row_filter_training(_FIT_GAP_INSERTED, row_filter_unlearn_significance=1e-4),
)

PRESETS: dict[str, MethodPreset] = {
    preset.name: preset
    for preset in (
        MethodPreset(
            name="full",
            description="Full fine-tuning, no adapter: every weight and the classifier train. lr 5e-5 (2e-4, the "
            "LoRA rate, is too high for full fine-tuning). Undefended baseline. " + _COMMON,
            adapter=AdapterSettings(kind="full"),
            training=TrainingSettings(learning_rate=5e-5),
        ),
        MethodPreset(
            name="lora",
            description="Plain LoRA r 8 / alpha 32 on peft's default targets (query,value for BERT); the classifier "
            "trains through modules_to_save (set freeze_head=true for the reference's frozen random head). "
            "Undefended baseline. " + _COMMON,
            adapter=AdapterSettings(kind="lora"),
        ),
        MethodPreset(
            name="mslr",
            description="The MuScleLoRA adapter alone, no gradient alignment: LoRA r 8 / alpha 32 on the body (as "
            "MSLR with scales [1]) plus MSLR scales 1..9, rank 1, alpha 6, Kaiming init on pooler.dense; classifier "
            "frozen at random init (reference). " + _COMMON,
            adapter=AdapterSettings(kind="musclelora", freeze_head=True, head_pattern="pooler.dense"),
        ),
        MethodPreset(
            name="musclelora",
            description="The published recipe: the mslr adapter plus gradient alignment on 96 clean-dev references "
            "(removed from dev), warm-up 1 epoch, max raw-gradient ratio 0.1, min reference loss 0.4, min "
            "reference-gradient norm 5e-7. " + _COMMON,
            adapter=AdapterSettings(kind="musclelora", freeze_head=True, head_pattern="pooler.dense"),
            training=TrainingSettings(ga=_ga(gradient_alignment=True)),
        ),
        MethodPreset(
            name="ga-lora",
            description="Gradient alignment (published gates, 96 references) on plain LoRA r 8 / alpha 32, "
            "classifier frozen at random init, no multi-scale adapter. " + _COMMON,
            adapter=AdapterSettings(kind="lora", freeze_head=True),
            training=TrainingSettings(ga=_ga(gradient_alignment=True)),
        ),
        MethodPreset(
            name="ga-lora-tuned",
            description="This project's gradient-alignment recipe for small encoders (docs/results.md): plain LoRA "
            "r 8 / alpha 32 with a trainable classifier, GA on every step (warm-up 0, raw ratio 0, min reference loss "
            "0) with 400 clean-dev references (removed from dev). " + _COMMON,
            adapter=AdapterSettings(kind="lora"),
            training=TrainingSettings(ga=_ga(reference_split_size=400, **_GA_EVERY_STEP)),
        ),
        _FIT_GAP,
        _FIT_GAP_UNLEARN,
        _FIT_GAP_POE,
        _FIT_GAP_TEACHER,
        _FIT_GAP_GATED,
        _FIT_GAP_GATED_REFIT,
        _FIT_GAP_EVIDENCE,
        _FIT_GAP_INSERTED,
        _FIT_GAP_EITHER,
        dataclasses.replace(
            _FIT_GAP_EITHER,
            name="recommended",
            description="The project's recommended defense, the best measured so far (docs/results.md): "
            "fit-gap-either. At full size (five seeds, against the mean of each seed's oracle, CACC 87.2) it "
            "removes the insertion backdoors (BadNets, AddSent: ASR 0.9 points below and 0.8 above the oracle's) at "
            "1.0 and 0.3 points of clean accuracy, without turning the trigger against the target class as the push "
            "to chance alone does (the target class's triggered rows keep their label 9-16 points less often than "
            "untriggered on BadNets and 0-2 on AddSent, a backdoor-free model 6-7 and 2-5; fit-gap-evidence 26-33 "
            "and 5-14), and holds the paraphrase backdoors (StyleBkd, SynBkd) to +0.4 / -2.1 points of the oracle's "
            "ASR at 1.2 / 0.9 points, on StyleBkd partly by leaning against the target class (false-target rate "
            "7-9 % against the oracle's 13-14 %). On unpoisoned data 0.29 under plain LoRA on average (0.0-0.8 by "
            "seed). 1.50x undefended LoRA's time in the same run on SynBkd's seed 1, 1.61x on StyleBkd, 1.88x on "
            "BadNets (CPU). It was fit-gap-poe until session 17, fit-gap-gated until session 20, fit-gap-gated-refit "
            "in session 20, fit-gap-evidence in sessions 21-25 and fit-gap-inserted in sessions 26-35. " + _COMMON,
        ),
        MethodPreset(
            name="lora-llama",
            description="Undefended baseline of the reference's Llama-2 experiments: LoRA r 2 / alpha 8 on "
            "q_proj,v_proj; `score` replaced by dense(hidden -> 16) -> dropout 0.1 -> out_proj, frozen at random "
            "init; lr 1e-5, 5 epochs, batch 16, max length 128 (the reference: 4096, unquantized). Use with a Llama "
            "--model, usually with --load-in-4bit (QLoRA). " + _COMMON,
            adapter=AdapterSettings(
                kind="lora",
                r=2,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj"],
                freeze_head=True,
                classification_head="mslr",
            ),
            training=_LLAMA_TRAINING,
        ),
        MethodPreset(
            name="musclelora-llama",
            description="The published Llama-2 recipe: lora-llama plus MSLR scales 1,2,3,4, rank 1, alpha 4, "
            "Kaiming init on the head's dense layer (score.dense), and gradient alignment on 128 clean-dev "
            "references with warm-up 0, max raw-gradient ratio 0, min reference loss 0 (GA on every step). " + _COMMON,
            adapter=AdapterSettings(
                kind="musclelora",
                r=2,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj"],
                freeze_head=True,
                classification_head="mslr",
                head_pattern="score.dense",
                head_scales=[1.0, 2.0, 3.0, 4.0],
                head_r=1,
                head_alpha=4,
            ),
            training=dataclasses.replace(_LLAMA_TRAINING, ga=_ga(reference_split_size=128, **_GA_EVERY_STEP)),
        ),
    )
}

#: The `--set` items of `musclelora bench --preset quick` (labelled quick in outputs): a seeded 2000-row subsample
#: trained 2 epochs at lr 1e-3, the smallest run in which undefended LoRA both learns the task and the backdoor (the
#: 480-row, one-epoch run it replaces left LoRA at chance, predicting the target for everything), and 300 rows of
#: each test set. Dev stays whole: the recommended defense takes its 400 trusted rows from it.
QUICK_OVERRIDES: dict[str, str] = {
    "num_train_epochs": "2",
    "learning_rate": "1e-3",
    "clean_only_epochs": "5",
    "max_train_rows": "2000",
    "max_test_rows": "300",
}


def get_preset(name: str, overrides: Optional[Mapping[str, Any]] = None) -> MethodPreset:
    """The preset called `name`, with optional typed overrides (`{leaf field: value}`); `ValueError` for an unknown
    name or field. `--set` strings become such a mapping in [`peft_musclelora.benchmark.overrides`]."""
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(PRESETS)}.")
    return apply_overrides(PRESETS[name], overrides or {})
