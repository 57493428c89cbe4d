"""The exported model folder and its model card."""

from __future__ import annotations

import shutil
from pathlib import Path

from sentence_transformers import SentenceTransformer

from st_mamba import MambaConfig
from training.distill import settings
from training.distill.checkpoints import load_checkpoint, restore
from training.distill.students import as_saved, build_mamba_student


def export(checkpoint: Path, output: Path, tokenizer_dir: Path, card: str | None = None) -> SentenceTransformer:
    """The Mamba student from a checkpoint, saved in fp16 as an st-mamba folder (optionally with a model card)."""
    tensors, meta = load_checkpoint(checkpoint)
    model = build_mamba_student(tokenizer_dir, config=meta["config"], pooling=meta.get("pooling", "eos"),
                                do_lower_case=meta.get("do_lower_case", False))  # fmt: skip
    restore(model, None, tensors, meta["step"])
    as_saved(model)
    model.half()
    if output.exists():
        shutil.rmtree(output)
    model.save(str(output))
    if card is not None:
        (output / "README.md").write_text(card)
    return model


POOLING_WORDS = {
    "eos": "the hidden state at EOS is the embedding (Mamba Retriever)",
    "mean": "the mean of the hidden states over the text and its EOS is the embedding",
    "weighted-mean": "the mean of the hidden states over the text and its EOS, each token weighed by a learned "
    "weight of its vocabulary entry, is the embedding",
}


# What the corpus builder's pairs are, by source.
PAIR_KINDS = {"wordnet": "WordNet (lemmas, gloss)", "gene-ontology": "Gene Ontology (term, definition)",
              "debian-descriptions": "Debian package (synopsis, description)", "mail": "mail (subject, body)",
              "wikipedia": "Wikipedia (title, lead section)", "factbook": "CIA World Factbook (country and field, text)",
              "recipes": "Wikibooks Cookbook (title, recipe)"}  # fmt: skip


def model_card(
    results: dict,
    scores: dict[str, dict],
    manifest: dict,
    more_speed: list[dict] = (),
    control: tuple[dict, dict[str, dict]] | None = None,
) -> str:
    """The exported model's README.md: what it is, how it was trained, and every score of the run.

    ``more_speed``: rows of ``speed`` measured elsewhere (the CPU), added to the run's own (GPU, fp16).
    ``control``: (results, scores) of another run that trained the Transformer control, for a run
    that did not (``train --no-control``): its two students, trained on the same batches for the
    same steps, get rows of their own.
    """
    train = results["train"]["mamba"]
    student = results["settings"]["mamba"]

    def cell(source: dict[str, dict], name: str, measure: str = "nDCG@10") -> str:
        value = source.get(name, {}).get(measure)
        return "-" if value is None else f"{value:.3f}"

    # (label, scores, key in scores): SciFact / TREC DL 2019 rows, then QMSum rows
    rows = [("teacher all-MiniLM-L6-v2", scores, "teacher"), ("**st-mamba-distilled**", scores, "mamba")]
    qmsum = [("teacher, first 256 tokens", scores, "teacher:model"),
             ("teacher, mean over 256-token windows", scores, "teacher:chunk:254:mean"),
             ("**st-mamba-distilled, whole meeting in one pass**", scores, "mamba:one-pass")]  # fmt: skip
    if "transformer" in results["train"]:
        rows.append(("Transformer student (control)", scores, "transformer"))
        qmsum.append(("Transformer student, first 8,192 tokens", scores, "transformer:model"))
        note = ""
    elif control is not None:
        control_results, control_scores = control
        steps = control_results["train"]["transformer"]["steps"]
        same = f"the same {steps:,} steps and batches"
        rows += [(f"Mamba student, {same} (control run)", control_scores, "mamba"),
                 (f"Transformer student, {same} (control run)", control_scores, "transformer")]  # fmt: skip
        qmsum += [(f"Mamba student, {same}, whole meeting", control_scores, "mamba:one-pass"),
                  (f"Transformer student, {same}, first 8,192 tokens", control_scores, "transformer:model")]  # fmt: skip
        planned = control_results["settings"]
        length = (
            f"{planned['train_steps']:,} steps" if planned.get("train_steps") else f"{planned['train_seconds']:g} s"
        )
        note = (f"\nThis run trained no Transformer (`train --no-control`): the control rows come from a run of "
                f"{length} that trained both students on {same}.\n")  # fmt: skip
    else:
        note = "\nThis run trained no Transformer control (`train --no-control`).\n"
    rows += [("BM25 (bm25s, the same corpus)", scores, "bm25"),
             ("BM25 run file (Anserini, whole MS MARCO collection)", scores, "bm25-run")]  # fmt: skip
    rows = [f"| {label} | {cell(source, f'scifact/{key}')} | {cell(source, f'trec-dl-2019/{key}')} |"
            for label, source, key in rows]  # fmt: skip
    qmsum = [f"| {label} | {cell(source, f'qmsum-summary/{key}')} | {cell(source, f'qmsum-specific/{key}')} |"
             for label, source, key in qmsum]  # fmt: skip
    cases = [
        f"| {label} | "
        + " | ".join(cell(scores, f"{name}/{key}") for name in ("scifact", *(f"scifact-{c}" for c in settings.RECASED)))
        + " |"
        for label, key in (("teacher all-MiniLM-L6-v2", "teacher"), ("**st-mamba-distilled**", "mamba"))
    ]
    sources = (
        ", ".join(sorted({name.split("/")[0] for name in manifest.get("tokens", {})})) or "the corpus builder's sources"
    )
    excluded = manifest.get("evaluation_collections_excluded")
    zero_shot = (
        f"No text of {', '.join(excluded)} (documents or queries, any split) entered training: every score below is zero-shot."
        if excluded
        else "**Not zero-shot**: this model's training corpus held texts of the collections scored below."
    )
    init = (
        "The token table started as the teacher's embedding of each GPT-NeoX token, reduced by PCA (the Model2Vec recipe), "
        "and texts are lower-cased. "
        if student.get("init") == "teacher"
        else ""
    )
    if by_source := manifest.get("pairs_by_source"):
        kinds = ", ".join(f"{count:,} {PAIR_KINDS.get(source, source)}" for source, count in by_source.items())
        pair_words = f"real pairs ({kinds})"
    else:
        pair_words = "real (lemmas, gloss) pairs of WordNet" if "wordnet" in sources else "real pairs"
    speed = [
        f"| {results['device'] if row['device'] == 'cuda' else row['device']} | {row['tokens']:,} | {row['model']} "
        f"| {row['texts_per_second']:.1f} | {row['tokens_per_second']:,} |"
        for row in [*results.get("speed", []), *more_speed]
    ]
    newline = "\n"
    ways = (("lower-cased", student.get("do_lower_case")),
            ("each run of whitespace as one space or line break", settings.SAVED_TEXT_READING.get("normalize_whitespace")),
            ("with a space before it", settings.SAVED_TEXT_READING.get("add_prefix_space")))  # fmt: skip
    reading = ", ".join(words for words, on in ways if on)
    trained = results.get("corpus", {}).get("text_reading", {})
    if any(settings.SAVED_TEXT_READING.values()):  # how its training read the texts' whitespace, beside it
        trained_so = all(trained.get(key) == value for key, value in settings.SAVED_TEXT_READING.items())
        reading += (
            ", as it read its training texts" if trained_so else " (it trained on texts with their whitespace as given)"
        )
    reading = f"; it reads a text {reading}" if reading else ""
    continued = ""
    if started := results["settings"].get("init_from"):
        peak = results["settings"].get("learning_rate", student.get("learning_rate", settings.LEARNING_RATE))
        earlier = "\n".join(f"> {line}" if line else ">" for line in (started.get("training") or "").splitlines())
        continued = (f"\nThese steps went on from an earlier model (its model.safetensors: SHA-256 {started['sha256']}), "
                     f"not from the teacher's table, at a peak learning rate of {peak:g}. That model's training, as its "
                     f"card gives it:\n\n{earlier or '> (no card)'}\n")  # fmt: skip
    held_out_words = " (texts this run held out; the earlier model may have trained on some of them)" if started else ""
    window_words = (
        ", each weighted by its word pieces" if results["settings"].get("target_window_weights") == "tokens" else ""
    )
    cosines = results["held_out_cosine"].get("mamba") or {}
    held_out = ", ".join(f"{kind} {value:.3f}" for kind, value in cosines.items()) or "not measured"
    relation, bank = results["settings"].get("relation_weight", 0.0), results["settings"].get("relation_bank", 0)
    others = (f"{bank:,} training texts drawn at random each step (their targets)" if bank
              else "its batch mates")  # fmt: skip
    if second := results["settings"].get("relation_teacher"):
        checked = ", the published model's" if second.get("verified") else ""
        others += (f", the teacher's cosines those of {second['name']} (model.safetensors SHA-256 "
                   f"{second['sha256']}{checked}), read in windows of {second['window']} tokens")  # fmt: skip
    relation_words = (
        f" + {relation:g} x the KL divergence from the teacher's to the student's softmax over each text's cosines "
        f"x {results['settings'].get('relation_scale', settings.RELATION_SCALE):g} to {others}"
        if relation
        else ""
    )
    return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags: [sentence-transformers, st-mamba, mamba{student["config"]["version"]}, distillation]
---
# st-mamba-distilled

A Mamba-{student["config"]["version"]} retriever ({student["config"]["n_layer"]} layers, d_model {student["config"]["d_model"]}, d_inner {MambaConfig(**student["config"]).d_inner}; EOS appended; {POOLING_WORDS[student["pooling"]]};
Dense to 384, L2 normalised, cosine) distilled from all-MiniLM-L6-v2 by `python -m training.distill` (docs/distillation.md).
{results["parameters"]["mamba"]["total"]:,} parameters ({results["parameters"]["mamba"]["token_embedding"]:,} of them the
GPT-NeoX-20B token embedding), fp16. Reads any length in one pass (long texts stream in chunks of
{settings.SAVED_CHUNK_SIZE} tokens carrying the state){reading}.

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("models/st-mamba-distilled", trust_remote_code=True)
```

## Training
Corpus: {manifest.get("gpt_neox_tokens", 0):,} GPT-NeoX tokens of offline text ({manifest.get("records", 0):,} texts from
{sources}; each source's licence is recorded in the corpus's manifest and listed in st-mamba's docs/distillation.md,
"The corpus"). {init}Target: the teacher's embedding, or for long texts the mean of
its embeddings over consecutive 256-token windows{window_words}. Loss: MSELoss x {settings.MSE_WEIGHT:g}{relation_words}, plus
MultipleNegativesRankingLoss x {settings.MNRL_WEIGHT} every {settings.MNRL_EVERY} steps on {results["corpus"]["pairs"]:,} {pair_words}.
{train["steps"]:,} steps, {train["tokens"]:,} tokens, {train["seconds"]} s on {results["device"]}.
{continued}
## Scores (nDCG@10, zero-shot)
{zero_shot}

| model | SciFact test | TREC DL 2019 (pooled corpus) |
|---|---|---|
{newline.join(rows)}
{note}
SciFact test with its queries re-cased (nDCG@10; a model that lower-cases its input scores the same on each):

| model | as given | UPPER CASE | lower case | Title Case |
|---|---|---|---|---|
{newline.join(cases)}

QMSum test meetings (35), nDCG@10:

| reading | summary -> meeting | question -> meeting |
|---|---|---|
{newline.join(qmsum)}

Held-out cosine to the teacher's target: {held_out}{held_out_words}.

## Encoding speed
GPU rows in fp16, CPU rows in fp32; the teacher reads long texts in 256-token windows.

| device | tokens a text | model | texts/s | tokens/s |
|---|---|---|---|---|
{newline.join(speed)}
"""
